# cython: language_level=3
"""The TLS record layer of a connection, in compiled code (issue 12 step 4).

pyOpenSSL keeps the contexts, verification and identities (its callbacks run inside
SSL_do_handshake whoever calls it); the server's handshake steps (`handshake`: the
client's ciphertext in, SSL_do_handshake, the answer out) and, once the handshake is done, the per-record work (ciphertext into the incoming memory
BIO, SSL_read, SSL_write, ciphertext out of the outgoing BIO) costs four or five calls
through pyOpenSSL's Python layer per record, each with its own checks and allocations.
Here it is one C call each, on the same SSL object and the same BIOs (the stream and this
layer can take turns on a connection: both leave nothing behind in between).

Which OpenSSL: the one pyOpenSSL uses, which is cryptography's (its wheels link OpenSSL
statically into `_rust.abi3.so`, so there is no libssl to link against): the addresses of
SSL_do_handshake, SSL_read, SSL_write, BIO_read, BIO_write, BIO_get_mem_data,
SSL_get_error, SSL_pending and ERR_clear_error are taken once from cryptography's cffi library (`ffi.addressof`), and
the SSL and BIO pointers from the pyOpenSSL Connection. Calling another libssl's functions
on those objects would be undefined; taking them from the same library cannot disagree.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uintptr_t

from OpenSSL import SSL
from OpenSSL._util import exception_from_error_queue

ctypedef int (*io_fn)(void *, void *, int) noexcept nogil
ctypedef int (*err_fn)(void *, int) noexcept nogil
ctypedef int (*pending_fn)(void *) noexcept nogil
ctypedef long (*mem_fn)(void *, char **) noexcept nogil
ctypedef void (*clear_fn)() noexcept nogil
ctypedef int (*step_fn)(void *) noexcept nogil

cdef io_fn ssl_read, ssl_write, bio_read, bio_write
cdef err_fn ssl_get_error
cdef pending_fn ssl_pending
cdef mem_fn bio_get_mem_data
cdef clear_fn err_clear_error
cdef step_fn ssl_do_handshake

# SSL_get_error's answers (ssl.h).
cdef enum:
    ERR_NONE = 0
    ERR_SSL = 1
    ERR_WANT_READ = 2
    ERR_WANT_WRITE = 3
    ERR_SYSCALL = 5
    ERR_ZERO_RETURN = 6

# Plaintext taken per SSL_read: one maximal TLS record (RFC 8446 section 5.1: 2^14).
DEF RECORD = 16384
cdef char scratch[RECORD]

from cryptography.hazmat.bindings._rust import _openssl as _binding  # noqa: E402

_ffi, _lib = _binding.ffi, _binding.lib


cdef uintptr_t _address(name):
    return <uintptr_t>int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, name)))


ssl_read = <io_fn>_address("SSL_read")
ssl_write = <io_fn>_address("SSL_write")
bio_read = <io_fn>_address("BIO_read")
bio_write = <io_fn>_address("BIO_write")
ssl_get_error = <err_fn>_address("SSL_get_error")
ssl_pending = <pending_fn>_address("SSL_pending")
bio_get_mem_data = <mem_fn>_address("BIO_get_mem_data")
err_clear_error = <clear_fn>_address("ERR_clear_error")
ssl_do_handshake = <step_fn>_address("SSL_do_handshake")


class RecordError(Exception):
    """The peer sent something the record layer refuses (a bad record, a failed MAC, an
    alert, a handshake that fails): the connection cannot go on. `str()` says OpenSSL's
    reason."""


def _pointer(cdata):
    return <uintptr_t>int(_ffi.cast("uintptr_t", cdata))


cdef class Records:
    """The record layer of one connection (a pyOpenSSL Connection over memory BIOs): the
    steps of a server's handshake, then the records once it is done."""

    cdef void *ssl
    cdef void *rbio
    cdef void *wbio
    cdef object conn  # keeps the SSL object and its BIOs alive
    cdef public bint eof  # close_notify received: no more plaintext will come

    def __init__(self, conn):
        self.conn = conn
        self.ssl = <void *><uintptr_t>_pointer(conn._ssl)
        self.rbio = <void *><uintptr_t>_pointer(conn._into_ssl)
        self.wbio = <void *><uintptr_t>_pointer(conn._from_ssl)
        self.eof = False

    cpdef bint handshake(self, bytes ciphertext):
        """One step of the handshake with the peer's `ciphertext`: True once it is done,
        False while it waits for more from the peer; what to send the peer meanwhile (the
        server's flight, session tickets, an alert) is in `outgoing()` either way. Raises
        RecordError with OpenSSL's reason when the handshake fails."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(ciphertext)
        cdef int r
        if n and bio_write(self.rbio, PyBytes_AS_STRING(ciphertext), <int>n) != n:
            raise RecordError("cannot buffer ciphertext")
        err_clear_error()
        r = ssl_do_handshake(self.ssl)
        if r == 1:
            return True
        if ssl_get_error(self.ssl, r) == ERR_WANT_READ:
            return False
        raise RecordError(_reason())

    cpdef bytes decrypt(self, bytes ciphertext):
        """The plaintext of the whole records in `ciphertext` and what came before it
        (b"" when no record is complete yet; `eof` once close_notify came). Raises
        RecordError on a broken record or an alert."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(ciphertext)
        cdef int r, err
        if n and bio_write(self.rbio, PyBytes_AS_STRING(ciphertext), <int>n) != n:
            raise RecordError("cannot buffer ciphertext")
        parts = None
        out = b""
        while True:
            err_clear_error()
            r = ssl_read(self.ssl, scratch, RECORD)
            if r > 0:
                chunk = PyBytes_FromStringAndSize(scratch, r)
                if not out:
                    out = chunk
                else:
                    if parts is None:
                        parts = [out]
                    parts.append(chunk)
                continue
            err = ssl_get_error(self.ssl, r)
            if err == ERR_WANT_READ:
                break
            if err == ERR_ZERO_RETURN:
                self.eof = True
                break
            raise RecordError(_reason())
        if parts is not None:
            return b"".join(parts)
        return out

    cpdef bytes encrypt(self, bytes plaintext):
        """`plaintext` as records, with anything else waiting to go out before them."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(plaintext)
        cdef Py_ssize_t done = 0
        cdef const char *p = PyBytes_AS_STRING(plaintext)
        cdef int r
        while done < n:
            err_clear_error()
            r = ssl_write(self.ssl, <void *>(p + done), <int>min(n - done, 1 << 30))
            if r <= 0:
                raise RecordError(_reason())
            done += r
        return self.outgoing()

    cpdef bytes outgoing(self):
        """Ciphertext the SSL object has for the peer (after a write, or records it
        answers by itself: a KeyUpdate, an alert), b"" when there is none."""
        cdef char *data
        cdef long n = bio_get_mem_data(self.wbio, &data)
        if n <= 0:
            return b""
        out = PyBytes_FromStringAndSize(NULL, n)
        if bio_read(self.wbio, PyBytes_AS_STRING(out), <int>n) != n:
            raise RecordError("cannot take ciphertext")
        return out

    cpdef bint idle(self):
        """Nothing buffered: no ciphertext waiting to be decrypted and no plaintext
        decrypted but not read (so only a socket edge can bring more)."""
        cdef char *data
        return bio_get_mem_data(self.rbio, &data) <= 0 and ssl_pending(self.ssl) <= 0


def _reason():
    """OpenSSL's error queue as text (emptied)."""
    try:
        exception_from_error_queue(SSL.Error)
    except SSL.Error as exc:
        args = exc.args[0] if exc.args else None
        if isinstance(args, list) and args and isinstance(args[0], tuple):
            return "; ".join(str(a[2]) for a in args)
        return str(exc) or "TLS error"
    return "TLS error"
