# A version 4 UUID's text from random bytes (uuid_text.pyx says why).
