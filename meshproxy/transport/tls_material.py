"""Certificates, keys and trust bundles as bytes: parsed, checked, described.

Why bytes and not file names: the supervisor reads every TLS file once, checks it, and sends
the very bytes it checked to the workers inside the snapshot. A worker therefore never reads
a file that changed after the check (rotation replaces files while the proxy runs), and all
workers serve the same material. Rotation is the supervisor noticing a file changed and
sending a new snapshot (process.cert_watch).

Identity: a workload's SPIFFE ID is the `spiffe://` URI SAN of its certificate
(spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>). Istio names a source by its
principal, the ID without the scheme (`cluster.local/ns/default/sa/web`); both forms are
produced here.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

SPIFFE = "spiffe://"


class TLSConfigError(Exception):
    """A certificate, key or bundle that cannot be used, named by its file."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate chain (PEM, leaf first) and its private key, with their file names."""

    chain_path: str
    chain_pem: bytes
    key_path: str
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class Bundle:
    """Trusted CA certificates (PEM), with the file name."""

    path: str
    pem: bytes


def read_files(paths: Iterable[str]) -> tuple[dict[str, bytes], list[str]]:
    """Read each file once: (path -> bytes, errors naming the files that could not be)."""
    out: dict[str, bytes] = {}
    errors: list[str] = []
    for path in paths:
        if path in out:
            continue
        try:
            with open(path, "rb") as f:
                out[path] = f.read()
        except OSError as exc:
            errors.append(f"{path}: cannot read: {exc.strerror or exc}")
    return out, errors


def load_chain(pem: bytes, path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise TLSConfigError(f"{path}: not a PEM certificate chain: {exc}") from None
    if not certs:
        raise TLSConfigError(f"{path}: no certificate in the file")
    return certs


PrivateKey = (rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
              | ed448.Ed448PrivateKey)


def load_key(pem: bytes, path: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, None)
    except (ValueError, TypeError) as exc:
        raise TLSConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise TLSConfigError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def _public_der(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def check_pair(pair: KeyPair) -> tuple[list[x509.Certificate], PrivateKey]:
    """The parsed chain and key; TLSConfigError when either is unusable or they do not
    belong together (the key of a different certificate)."""
    chain = load_chain(pair.chain_pem, pair.chain_path)
    key = load_key(pair.key_pem, pair.key_path)
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise TLSConfigError(f"{pair.key_path}: private key does not match the certificate "
                             f"in {pair.chain_path}")
    return chain, key


def load_bundle(bundle: Bundle) -> list[x509.Certificate]:
    return load_chain(bundle.pem, bundle.path)


CRL_BEGIN = b"-----BEGIN X509 CRL-----"


def load_crls(bundle: Bundle) -> list[x509.CertificateRevocationList]:
    """Every revocation list of a PEM file (one or more BEGIN X509 CRL blocks)."""
    blocks = [CRL_BEGIN + part for part in bundle.pem.split(CRL_BEGIN)[1:]]
    if not blocks:
        raise TLSConfigError(f"{bundle.path}: no certificate revocation list in the file")
    try:
        return [x509.load_pem_x509_crl(b) for b in blocks]
    except ValueError as exc:
        raise TLSConfigError(f"{bundle.path}: not a PEM revocation list: {exc}") from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def dns_names(cert: x509.Certificate) -> list[str]:
    """DNS names (SANs, else the common name), lowercased."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
                 if isinstance(a.value, str)]
    return [n.lower() for n in names]


def san_set(cert: x509.Certificate) -> set[str]:
    """URI and DNS SANs: what match_subject_alt_names compares with (exact)."""
    return set(uri_sans(cert)) | set(dns_names(cert))


def spiffe_id(cert: x509.Certificate) -> str:
    """The certificate's SPIFFE ID, or "" (the first spiffe:// URI SAN)."""
    for uri in uri_sans(cert):
        if uri.startswith(SPIFFE):
            return uri
    return ""


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex, the first 16 digits: how roots are named in
    status records, logs and `meshctl ca status`."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def principal(spiffe: str) -> str:
    """Istio's principal: the SPIFFE ID without its scheme."""
    return spiffe[len(SPIFFE):] if spiffe.startswith(SPIFFE) else spiffe


def namespace(spiffe: str) -> str:
    """The namespace of an Istio-shaped ID (.../ns/<namespace>/sa/...), or ""."""
    parts = principal(spiffe).split("/")
    for i in range(1, len(parts) - 1):
        if parts[i] == "ns":
            return parts[i + 1]
    return ""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is at the other end of a verified connection."""

    spiffe_id: str
    principal: bytes   # Istio form, as bytes for matching on the data path
    namespace: str
    xfcc: bytes        # this hop's x-forwarded-client-cert element


def peer_identity(cert: x509.Certificate, by: str) -> PeerIdentity:
    """The identity of a verified client certificate and the x-forwarded-client-cert
    element Envoy and Istio send for it (`By` = our own URI, `Hash` = SHA-256 of the
    client certificate's DER, `Subject`, `URI`)."""
    sid = spiffe_id(cert)
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    subject = cert.subject.rfc4514_string().replace('"', '\\"')
    parts = [f"By={by}"] if by else []
    parts += [f"Hash={digest}", f'Subject="{subject}"']
    uri = sid or next(iter(uri_sans(cert)), "")
    if uri:
        parts.append(f"URI={uri}")
    return PeerIdentity(sid, principal(sid).encode(), namespace(sid),
                        ";".join(parts).encode("utf-8", "replace"))


def describe_cert(cert: x509.Certificate, path: str, now: datetime.datetime) -> dict[str, object]:
    """Envoy's /certs entry for one certificate."""
    expires = cert.not_valid_after_utc
    return {
        "path": path,
        "serial_number": format(cert.serial_number, "x"),
        "subject": cert.subject.rfc4514_string(),
        "subject_alt_names": [{"uri": u} for u in uri_sans(cert)]
                             + [{"dns": d} for d in dns_names(cert)],
        "spiffe_id": spiffe_id(cert),
        "days_until_expiration": int((expires - now).total_seconds() // 86400),
        "valid_from": cert.not_valid_before_utc.isoformat(),
        "expiration_time": expires.isoformat(),
    }
