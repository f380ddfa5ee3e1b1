"""TLS contexts (pyOpenSSL): listeners (certificates by SNI, ALPN, mTLS) and upstream
clusters (SNI, client certificate, verification, expected SANs), under one modern policy.

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
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi  # pyOpenSSL's cffi bindings (see _SanCheck)
from OpenSSL._util import lib as _lib

from meshproxy.transport.tls_material import (
    Bundle,
    KeyPair,
    PeerIdentity,
    TLSConfigError,
    check_pair,
    dns_names,
    load_bundle,
    load_crls,
    peer_identity,
    san_set,
    spiffe_id,
)

__all__ = ["ClientTLS", "ServerTLS", "TLSConfigError", "describe"]

TLS12_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                 b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
DEFAULT_ALPN = (b"http/1.1",)
# Session-id context: OpenSSL refuses to resume sessions of a context that verifies peers
# unless one is set (a session must not be resumed into a context with other rules).
SESSION_ID = b"meshproxy"


def _policy(ctx: SSL.Context) -> None:
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION)
    ctx.set_cipher_list(TLS12_CIPHERS)


def _use_pair(ctx: SSL.Context, pair: KeyPair) -> x509.Certificate:
    chain, key = check_pair(pair)
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except SSL.Error as exc:
        raise TLSConfigError(f"{pair.chain_path}: unusable certificate or key: {exc}") from None
    return chain[0]


def _trust(ctx: SSL.Context, bundle: Bundle, advertise: bool, crl: Bundle | None = None,
           crl_leaf_only: bool = False) -> None:
    """Trust `bundle`'s CAs; with `crl`, a revoked certificate fails verification (every
    certificate of the chain is checked, as Envoy does, unless `crl_leaf_only`: then a CA
    without a list is not an error)."""
    store = ctx.get_cert_store()
    assert store is not None
    if crl is not None:
        for revocations in load_crls(crl):
            store.add_crl(revocations)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK if crl_leaf_only
                        else crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
    for ca in load_bundle(bundle):
        try:
            store.add_cert(crypto.X509.from_cryptography(ca))
        except (SSL.Error, crypto.Error) as exc:
            raise TLSConfigError(f"{bundle.path}: unusable CA certificate: {exc}") from None
        if advertise:
            ctx.add_client_ca(ca)  # named in the CertificateRequest


def _verified_identity(conn: SSL.Connection, by: str) -> PeerIdentity | None:
    """The identity of a peer whose certificate OpenSSL verified (chain to the bundle,
    validity period, purpose: a client certificate must allow clientAuth, a server's
    serverAuth)."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    return peer_identity(cert, by)


class _SanCheck:
    """The listener's verify callback when it lists match_subject_alt_names: OpenSSL's
    verdict for every certificate of the chain, and for the client's own (depth 0) also one
    of the expected SANs.

    Why not pyOpenSSL's set_verify: a Python callback that says no leaves the store's error
    at X509_V_OK, which OpenSSL turns into an `internal_error` alert, telling the client the
    server broke. This callback is installed with SSL_CTX_set_verify through pyOpenSSL's own
    cffi bindings (as tls_stream reads its BIOs), and refuses with X509_V_ERR_CERT_REJECTED,
    which OpenSSL answers with `bad_certificate` (RFC 8446 6.2). The reason is kept on the
    connection (its app data) for the log."""

    def __init__(self, expected: frozenset[str]) -> None:
        self.expected = expected
        # Kept on the object: the C side holds only a pointer to it.
        self.callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", self._verify,
                                      onerror=self._failed)

    def install(self, ctx: SSL.Context, mode: int) -> None:
        _lib.SSL_CTX_set_verify(ctx._context, mode, self.callback)

    def _verify(self, ok: int, store: Any) -> int:
        if not ok or _lib.X509_STORE_CTX_get_error_depth(store) != 0:
            return ok
        x509 = _lib.X509_STORE_CTX_get_current_cert(store)
        _lib.X509_up_ref(x509)
        sans = san_set(crypto.X509._from_raw_x509_ptr(x509).to_cryptography())
        if sans & self.expected:
            return 1
        _lib.X509_STORE_CTX_set_error(store, _lib.X509_V_ERR_CERT_REJECTED)
        ssl = _lib.X509_STORE_CTX_get_ex_data(store, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
        conn = SSL.Connection._reverse_mapping.get(ssl)
        if conn is not None:
            conn.set_app_data(SanRefused(f"client certificate SANs {sorted(sans)} match none "
                                         f"of {sorted(self.expected)}"))
        return 0

    @staticmethod
    def _failed(exc_type: Any, exc: Any, tb: Any) -> int:
        return 0  # a callback that broke refuses (cffi: the value returned on an exception)


class SanRefused(str):
    """Why a client certificate was refused by match_subject_alt_names (a connection's app
    data after its handshake failed)."""


class ServerTLS:
    """The contexts of one listener. `connection()` makes a memory-BIO SSL object.

    mTLS: with a trust bundle, a client certificate is asked for and, when presented, must
    verify (chain to the bundle, validity period, clientAuth purpose) or the handshake fails;
    `match_sans` (Envoy's match_subject_alt_names, exact, URI or DNS) fails a handshake
    whose client certificate carries none of them, with a bad_certificate alert.
    `require_client` also fails a handshake without one (Istio STRICT; optional is
    PERMISSIVE for certificates)."""

    def __init__(self, certs: Sequence[KeyPair], alpn: Sequence[bytes] = DEFAULT_ALPN,
                 trusted_ca: Bundle | None = None, require_client: bool = False,
                 match_sans: Sequence[str] = (), crl: Bundle | None = None,
                 crl_leaf_only: bool = False) -> None:
        if not certs:
            raise TLSConfigError("a TLS listener needs at least one certificate")
        offered = list(alpn)

        def select(conn: SSL.Connection, protos: list[bytes]) -> bytes:
            for p in offered:
                if p in protos:
                    return p
            return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]

        self.contexts: list[SSL.Context] = []
        self.exact: dict[bytes, SSL.Context] = {}
        self.wildcard: dict[bytes, SSL.Context] = {}
        # Our own SPIFFE ID per context: the `By` of x-forwarded-client-cert.
        self.own_id: dict[SSL.Context, str] = {}
        # One callback for every context, alive as long as they are.
        san_check = self.san_check = _SanCheck(frozenset(match_sans)) if match_sans else None
        for pair in certs:
            ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
            _policy(ctx)
            ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
            leaf = _use_pair(ctx, pair)
            ctx.set_alpn_select_callback(select)
            ctx.set_session_id(SESSION_ID)
            if trusted_ca is not None:
                _trust(ctx, trusted_ca, True, crl, crl_leaf_only)
                mode = SSL.VERIFY_PEER
                if require_client:
                    mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
                # Without SANs to match, no callback: OpenSSL's own verification decides.
                if san_check is not None:
                    san_check.install(ctx, mode)
                else:
                    ctx.set_verify(mode, None)
            self.contexts.append(ctx)
            self.own_id[ctx] = spiffe_id(leaf)
            for name in dns_names(leaf):
                if name.startswith("*."):
                    self.wildcard.setdefault(name[1:].encode(), ctx)
                else:
                    self.exact.setdefault(name.encode(), ctx)
        self.mtls = trusted_ca is not None
        self.default = self.contexts[0]
        for ctx in self.contexts:
            ctx.set_tlsext_servername_callback(self._on_servername)

    @classmethod
    def from_spec(cls, spec: Any) -> ServerTLS:
        """From a listener's compiled TLSSpec (config.compile)."""
        return cls(spec.certificates, spec.alpn, spec.trusted_ca, spec.require_client,
                   spec.match_sans, spec.crl, spec.crl_leaf_only)

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

    def peer(self, conn: SSL.Connection) -> PeerIdentity | None:
        """After the handshake: the verified client's identity (None without mTLS or
        without a client certificate)."""
        if not self.mtls:
            return None
        return _verified_identity(conn, self.own_id.get(conn.get_context(), ""))


class ClientTLS:
    """Upstream TLS for one cluster: SNI, an optional client certificate (mTLS), verification
    against a trust bundle, and the SANs an endpoint's certificate must carry.

    Without a trust bundle the upstream's certificate is not verified (Envoy's behaviour
    without a validation context); the README says to set one. `match_sans` is Envoy's
    match_subject_alt_names with exact matching, against URI (SPIFFE ID) and DNS SANs."""

    def __init__(self, sni: str, cert: KeyPair | None, trusted_ca: Bundle | None,
                 match_sans: Sequence[str] = (), alpn: Sequence[bytes] = DEFAULT_ALPN,
                 crl: Bundle | None = None, crl_leaf_only: bool = False) -> None:
        ctx = self.context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        _policy(ctx)
        if cert is not None:
            _use_pair(ctx, cert)
        if trusted_ca is not None:
            _trust(ctx, trusted_ca, False, crl, crl_leaf_only)
            ctx.set_verify(SSL.VERIFY_PEER)
        ctx.set_alpn_protos(list(alpn))
        self.sni = sni.encode("idna") if sni else b""
        self.match_sans = frozenset(match_sans)

    @classmethod
    def from_spec(cls, spec: Any, alpn: Sequence[bytes] = DEFAULT_ALPN) -> ClientTLS:
        """From a cluster's compiled UpstreamTLSSpec (config.compile), offering `alpn`."""
        return cls(spec.sni, spec.certificate, spec.trusted_ca, spec.match_sans, alpn,
                   crl=spec.crl, crl_leaf_only=spec.crl_leaf_only)

    def connection(self) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        if self.sni:
            conn.set_tlsext_host_name(self.sni)
        conn.set_connect_state()
        return conn

    def check_peer(self, conn: SSL.Connection) -> str:
        """After the handshake: "" when the endpoint's certificate carries an expected SAN
        (or none is expected), else why not."""
        if not self.match_sans:
            return ""
        cert = conn.get_peer_certificate(as_cryptography=True)
        if cert is None:
            return "upstream presented no certificate"
        sans = san_set(cert)
        if sans & self.match_sans:
            return ""
        return (f"upstream certificate SANs {sorted(sans)} match none of "
                f"{sorted(self.match_sans)}")


def describe(conn: SSL.Connection) -> dict[str, str]:
    """What was negotiated, for logs and tests."""
    return {"version": conn.get_protocol_version_name(), "cipher": conn.get_cipher_name() or "",
            "alpn": (conn.get_alpn_proto_negotiated() or b"").decode(),
            "server_name": (conn.get_servername() or b"").decode()}
