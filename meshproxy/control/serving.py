"""The control plane's own TLS identity on its discovery port: a certificate its CA issues
to it (for the names and addresses proxies dial), re-made at half its lifetime and whenever
the signing CA changes (a root rotation), held in memory only.

Why a memfd: the standard library's ssl loads a certificate and key only from file names,
and the key must not touch a disk; an anonymous memory file (memfd_create, Linux) read
through /proc/self/fd gives it a name that is no file anywhere. New handshakes use the
new certificate at once (load_cert_chain replaces it in the context); connections keep
theirs.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl

import trio

from meshproxy.control.ca import SERVING_TTL, Authority, serving_certificate

log = logging.getLogger("meshproxy.control.serving")


def _load(ctx: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    fd = os.memfd_create("meshproxy-serving", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain + key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class ServingIdentity:
    def __init__(self, authority: Authority, names: list[str]) -> None:
        self.authority = authority
        self.names = names
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._changed = trio.Event()
        self.issue()

    def issue(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        chain, key = serving_certificate(self.authority.signer(), self.names, now)
        _load(self.context, chain, key)
        log.info("serving certificate for %s from root %s", ", ".join(self.names),
                 self.authority.signer().root_fingerprint)

    def signer_changed(self) -> None:
        self.issue()

    async def renew(self) -> None:
        while True:
            await trio.sleep(SERVING_TTL / 2)
            self.issue()
