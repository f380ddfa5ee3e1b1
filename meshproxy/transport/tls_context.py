"""Server-side TLS contexts (pyOpenSSL): certificates by SNI, ALPN, a modern policy.

Policy, and why:
- TLS 1.2 and 1.3 only: older versions have known attacks and no modern cipher suites;
- TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only (forward secrecy, no CBC,
  no RSA key exchange), the server's order preferred; TLS 1.3 suites are all AEAD;
- no renegotiation (SSL_OP_NO_RENEGOTIATION): a client-initiated renegotiation is a
  denial-of-service lever and is refused; no compression (CRIME);
- session resumption with tickets (OpenSSL's default, keys rotated by OpenSSL), so a
  returning client skips the full handshake.

SNI: one context per certificate; the servername callback moves the connection to the
context whose names match the requested server name (exact, then `*.suffix`), falling back
to the first certificate. ALPN: the server picks the first of its protocols the client
offers; until HTTP/2 is served that is only `http/1.1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
DEFAULT_ALPN = (b"http/1.1",)


class TLSConfigError(Exception):
    """A certificate or key that cannot be used, named by its file."""


@dataclass(frozen=True)
class CertificateFiles:
    chain: str  # PEM: the leaf first, then intermediates
    key: str    # PEM private key


def _names(chain_path: str) -> list[str]:
    """DNS names of the leaf certificate (SANs, else the common name), lowercased."""
    with open(chain_path, "rb") as f:
        leaf = x509.load_pem_x509_certificate(f.read())
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                 if isinstance(a.value, str)]
    return [n.lower() for n in names]


def _context(cert: CertificateFiles, alpn: Sequence[bytes]) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION
                    | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(TLS12_CIPHERS)
    try:
        ctx.use_certificate_chain_file(cert.chain)
    except (SSL.Error, OSError) as exc:
        raise TLSConfigError(f"{cert.chain}: cannot load certificate chain: {exc}") from None
    try:
        ctx.use_privatekey_file(cert.key)
        ctx.check_privatekey()
    except (SSL.Error, OSError) as exc:
        raise TLSConfigError(f"{cert.key}: private key unusable or not matching "
                             f"{cert.chain}: {exc}") from None
    offered = list(alpn)

    def select(conn: SSL.Connection, protos: list[bytes]) -> bytes:
        for p in offered:
            if p in protos:
                return p
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

    ctx.set_alpn_select_callback(select)
    return ctx


class ServerTLS:
    """The contexts of one listener. `connection()` makes a memory-BIO SSL object."""

    def __init__(self, certs: Sequence[CertificateFiles],
                 alpn: Sequence[bytes] = DEFAULT_ALPN) -> None:
        if not certs:
            raise TLSConfigError("a TLS listener needs at least one certificate")
        self.contexts = [_context(c, alpn) for c in certs]
        self.exact: dict[bytes, SSL.Context] = {}
        self.wildcard: dict[bytes, SSL.Context] = {}
        for cert, ctx in zip(certs, self.contexts, strict=True):
            for name in _names(cert.chain):
                if name.startswith("*."):
                    self.wildcard.setdefault(name[1:].encode(), ctx)
                else:
                    self.exact.setdefault(name.encode(), ctx)
        self.default = self.contexts[0]
        for ctx in self.contexts:
            ctx.set_tlsext_servername_callback(self._on_servername)

    def context_for(self, server_name: bytes | None) -> SSL.Context:
        if server_name:
            name = server_name.lower()
            ctx = self.exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(b".")
            if dot > 0:
                ctx = self.wildcard.get(name[dot:])
                if ctx is not None:
                    return ctx
        return self.default

    def _on_servername(self, conn: SSL.Connection) -> None:
        ctx = self.context_for(conn.get_servername())
        if ctx is not conn.get_context():
            conn.set_context(ctx)

    def connection(self) -> SSL.Connection:
        conn = SSL.Connection(self.default, None)  # None: memory BIOs
        conn.set_accept_state()
        return conn


def describe(conn: SSL.Connection) -> dict[str, str]:
    """What was negotiated, for logs and tests."""
    return {"version": conn.get_protocol_version_name(), "cipher": conn.get_cipher_name() or "",
            "alpn": (conn.get_alpn_proto_negotiated() or b"").decode(),
            "server_name": (conn.get_servername() or b"").decode()}

