"""Request authorities: the absolute-form request target split into authority and path
(RFC 9112 section 3.2.2), and which authorities may name a mesh service: on-demand
discovery asks the control plane only for those (never for an IP literal, or for anything
a hostile client could make up that is not a DNS name), and asks without the port."""

from __future__ import annotations

import re

MAX_AUTHORITY = 253  # a DNS name's limit (RFC 1035 section 2.3.4)
# What may name a service: DNS labels, then an optional port (dropped).
_AUTHORITY = re.compile(rb"([a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*"
                        rb"[a-z0-9])?)*)(?::[0-9]{1,5})?")


def service_authority(host: bytes) -> bytes | None:
    """The name of `host` without its port, when it can name a service; None otherwise
    (IP literals and anything else are not asked for)."""
    host = host.lower()
    m = _AUTHORITY.fullmatch(host)
    if m is None or len(m.group(1)) > MAX_AUTHORITY:
        return None
    name = m.group(1)
    if name.replace(b".", b"").isdigit():
        return None
    return name


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """http://authority/path?q -> (authority, /path?q) (RFC 9112 section 3.2.2)."""
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        rest = target[8:]
    else:
        return None
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        return None  # userinfo is deprecated and a phishing vector (RFC 9110 section 4.2.4)
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path
