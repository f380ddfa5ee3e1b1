"""Join tokens: how a workload proves who it is before it gets an identity (`meshctl token
create --namespace NS --service-account SA --ttl 24h`).

A token is a JWT (RFC 7519) signed with ES256 (RFC 7518 3.4: ECDSA P-256 with SHA-256, the
signature as R || S) by the control plane's token key (`token-key.pem`, mode 0600, in the
CA directory). It names exactly one service account of one namespace and expires:

    header  {"alg": "ES256", "typ": "JWT", "kid": <the key's fingerprint>}
    claims  {"iss": "meshproxy-control", "aud": "meshproxy-join", "sub": <SPIFFE ID>,
             "ns": NS, "sa": SA, "iat": ..., "nbf": ..., "exp": ..., "jti": <random>}

Checks (verify): three base64url parts; the header's alg is ES256 and nothing else (no
"none", no HMAC with the public key: the classic JWT confusions); the kid is this key's;
the signature verifies; iss and aud are ours; nbf - CLOCK_SKEW <= now < exp; ns and sa
are names. A token is not single-use: every replica of a service account may join with it
until it expires, as a Kubernetes service-account token may. Sans-IO: `now` is given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meshproxy.control.ca import read_private, write_private
from meshproxy.transport.tls_material import load_key

ISSUER = "meshproxy-control"
AUDIENCE = "meshproxy-join"
DEFAULT_TTL = 24 * 3600.0
MAX_TTL = 365 * 24 * 3600.0
# Replicas' clocks may differ by this much: a token made by one is valid on another at once
# (nbf). Expiry has no leeway: the control plane both makes and checks tokens, so an
# operator's --ttl means what it says.
CLOCK_SKEW = 30.0
# A token is a few hundred bytes; anything much larger is not one of ours.
MAX_TOKEN = 4096
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class TokenError(Exception):
    """Why a token was refused (logged and counted; the client is told only 401)."""


@dataclass(frozen=True)
class Claims:
    namespace: str
    service_account: str
    subject: str
    expires: float
    token_id: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenKey:
    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        if key.curve.name != "secp256r1":
            raise ValueError("ES256 needs a P-256 key")
        self.key = key
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = hashlib.sha256(der).hexdigest()[:16]

    @classmethod
    def open(cls, path: Path) -> TokenKey:
        """The key in `path`, made (mode 0600) when there is none."""
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
            return cls(key)
        loaded = load_key(read_private(path), str(path))
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: the token key must be an EC P-256 key")
        return cls(loaded)

    def create(self, namespace: str, service_account: str, subject: str, ttl: float,
               now: float) -> str:
        if not (_NAME.match(namespace) and _NAME.match(service_account)):
            raise TokenError("namespace and service account must be RFC 1123 labels")
        if not 0 < ttl <= MAX_TTL:
            raise TokenError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds")
        header = {"alg": "ES256", "typ": "JWT", "kid": self.kid}
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "ns": namespace,
                  "sa": service_account, "iat": int(now), "nbf": int(now),
                  "exp": int(now + ttl), "jti": secrets.token_hex(12)}
        signing_input = (_b64(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64(json.dumps(claims, separators=(",", ":")).encode()))
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def verify(self, token: str, now: float) -> Claims:
        if len(token) > MAX_TOKEN:
            raise TokenError("too long to be a join token")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("not a JWT (three dot-separated parts)")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            sig = _unb64(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise TokenError("not a JWT (bad base64url or JSON)") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenError("not a JWT (header or claims not an object)")
        if header.get("alg") != "ES256":
            raise TokenError(f"algorithm {header.get('alg')!r} refused (ES256 only)")
        if header.get("kid") != self.kid:
            raise TokenError(f"signed by another key (kid {header.get('kid')!r})")
        if len(sig) != 64:
            raise TokenError("an ES256 signature is 64 bytes")
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                   int.from_bytes(sig[32:], "big"))
        try:
            self.key.public_key().verify(der, f"{parts[0]}.{parts[1]}".encode(),
                                         ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise TokenError("the signature does not verify (forged or altered)") from None
        if claims.get("iss") != ISSUER or claims.get("aud") != AUDIENCE:
            raise TokenError("not a join token of this control plane (iss or aud)")
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            raise TokenError("exp and nbf must be numbers")
        if now >= exp:
            raise TokenError(f"expired {now - exp:.0f} s ago")
        if now + CLOCK_SKEW < nbf:
            raise TokenError("not valid yet")
        ns, sa = claims.get("ns"), claims.get("sa")
        if not (isinstance(ns, str) and isinstance(sa, str) and _NAME.match(ns)
                and _NAME.match(sa)):
            raise TokenError("ns and sa must be names")
        return Claims(ns, sa, str(claims.get("sub", "")), float(exp),
                      str(claims.get("jti", "")))
