"""The proxy's mesh identity: its key, its CSR, the certificate the control plane's CA
issued for it, and when to renew (the decisions; process/discovery_client.py does the I/O).

Rules (DESIGN.md section 7, Istio's istio-agent):
- the key is EC P-256, made in memory for every request (a renewal is a new key too); it
  is never written anywhere, logged, or sent: the CSR carries only the public key. The
  workers get it in their snapshot over the supervisor's pipe, the only place it goes;
- the CSR names no identity: the control plane signs the one its join token proves;
- an issued chain is checked before it is used: it parses, its leaf carries this key, and
  it chains to the trust bundle sent with it;
- renewal at RENEW_RATIO of the lifetime (istio-agent's SECRET_GRACE_PERIOD_RATIO 0.5),
  the ratio moved by up to +-RENEW_JITTER (its SECRET_GRACE_PERIOD_RATIO_JITTER 0.01) at
  random per certificate, so sidecars started together do not renew together;
- a failed renewal is retried after a jittered back-off that doubles from RETRY_BASE, at
  most RETRY_CAP and never later than a quarter of the time left (so several tries fit
  before expiry).
"""

from __future__ import annotations

import datetime
import itertools
import random
import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.control.messages import ROOT_CA, WORKLOAD_CHAIN, WORKLOAD_KEY
from meshproxy.transport.tls_material import fingerprint, spiffe_id

RENEW_RATIO = 0.5
RENEW_JITTER = 0.01
RETRY_BASE = 1.0
RETRY_CAP = 60.0
# A CSR unanswered this long is asked again (the stream may be half-dead).
ANSWER_TIMEOUT = 10.0


class IdentityError(Exception):
    """An issued certificate that cannot be used (said, and the request retried)."""


def new_request() -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM): a fresh P-256 key and a CSR for it, with no name in it."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Identity:
    chain_pem: bytes
    key_pem: bytes  # memory only
    trust_bundle: bytes
    spiffe_id: str
    serial: str
    not_before: float
    not_after: float
    root: str  # fingerprint of the bundle root the leaf chains to
    renew_at: float

    def secrets(self) -> dict[str, bytes]:
        return {WORKLOAD_CHAIN: self.chain_pem, WORKLOAD_KEY: self.key_pem,
                ROOT_CA: self.trust_bundle}

    def describe(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        return {"spiffe_id": self.spiffe_id, "serial_number": self.serial,
                "not_before": _iso(self.not_before), "expiration_time": _iso(self.not_after),
                "next_renewal": _iso(self.renew_at),
                "seconds_until_renewal": round(self.renew_at - now, 3), "root": self.root}


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat()


def renew_time(not_before: float, not_after: float, rng: random.Random | None = None,
               jitter: float = RENEW_JITTER) -> float:
    r = (rng or random).uniform(-jitter, jitter)
    return not_before + (not_after - not_before) * (RENEW_RATIO + r)


def retry_delay(attempt: int, now: float, not_after: float | None,
                rng: random.Random | None = None) -> float:
    delay = min(RETRY_CAP, RETRY_BASE * 2 ** attempt)
    if not_after is not None:
        delay = min(delay, max(0.5, (not_after - now) / 4))
    return (rng or random).uniform(delay / 2, delay)


def accept(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, jitter: float = RENEW_JITTER
           ) -> Identity:
    """The identity of an issued chain, checked against its key and the bundle."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise IdentityError(f"the issued chain or bundle does not parse: {exc}") from None
    if not chain or not roots:
        raise IdentityError("an empty chain or trust bundle was issued")
    key = serialization.load_pem_private_key(key_pem, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (chain[0].public_key().public_bytes(serialization.Encoding.DER, spki)
            != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise IdentityError("the issued certificate is not for this proxy's key")
    sid = spiffe_id(chain[0])
    if not sid:
        raise IdentityError("the issued certificate carries no SPIFFE ID")
    # The chain's last certificate is issued by (or is) one of the bundle's roots.
    top = chain[-1]
    root = next((r for r in roots if r == top), None)
    if root is None:
        for r in roots:
            try:
                top.verify_directly_issued_by(r)
            except Exception:
                continue
            root = r
            break
    if root is None:
        raise IdentityError("the issued chain does not lead to a root of the trust bundle")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except Exception as exc:
            raise IdentityError(f"the issued chain is broken: {exc}") from None
    nb = chain[0].not_valid_before_utc.timestamp()
    na = chain[0].not_valid_after_utc.timestamp()
    return Identity(chain_pem, key_pem, bundle_pem, sid, format(chain[0].serial_number, "x"),
                    nb, na, fingerprint(root), renew_time(nb, na, jitter=jitter))
