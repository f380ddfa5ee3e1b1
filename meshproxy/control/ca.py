"""The mesh's certificate authority (Istio's istiod CA): workload certificates signed from
CSRs, the control plane's own serving certificate, the trust bundle, and the files a root
rotation moves through.

Where the CA's key lives: in a file with mode 0600 in the CA directory (`meshproxy control
--ca-dir DIR`), never in the store (which replicas, backups and `etcdctl get` all read).
The directory has istiod's plugged-in layout, so an operator brings their own intermediate
CA the way Istio takes one (the `cacerts` secret):

    ca-cert.pem     the signing CA's certificate (an intermediate, or the root itself)
    ca-key.pem      its private key, mode 0600 (refused when group or others can read it)
    cert-chain.pem  the signing CA's chain up to the root (leaves are sent with it)
    root-cert.pem   the root(s) every workload trusts
    token-key.pem   the key join tokens are signed with (control/tokens.py), mode 0600

All four CA files present: they are used as they are (plugged in). None present: a
self-signed root is made (EC P-256, ten years; istiod's self-signed CA) and written there.
Some present: refused, naming the missing ones. Several replicas share one CA: give each
the same files (istiod's replicas all mount the same cacerts).

Issuance rules (DESIGN.md section 7): the SAN is the SPIFFE ID of the *authenticated*
workload (spiffe://<trust-domain>/ns/<ns>/sa/<sa>), never taken from the CSR: a CSR whose
own SANs name anything else is refused; its subject is ignored. Leaves are not CAs, carry
serverAuth and clientAuth, a random 128-bit serial, and are backdated a little for clock
skew (at most 60 s and at most 2% of their lifetime, so a 20 s test lifetime is not half
gone at issuance).

Rotation (`next/` holds the new root's four files while it runs, control/rotation.py drives
the phases): the bundle is both roots during TRUST_BOTH and ISSUE_NEW; leaves come from the
new root from ISSUE_NEW on; the old root is dropped in DROP_OLD, and at the end `next/`
becomes the directory's files (the old ones are kept in `retired/<fingerprint>/`).
"""

from __future__ import annotations

import datetime
import itertools
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshproxy.transport.tls_material import SPIFFE, fingerprint, load_key

DEFAULT_TRUST_DOMAIN = "cluster.local"
# istiod's DEFAULT_WORKLOAD_CERT_TTL and MAX_WORKLOAD_CERT_TTL.
DEFAULT_LEAF_TTL = 24 * 3600.0
MAX_LEAF_TTL = 90 * 24 * 3600.0
ROOT_TTL = 10 * 365 * 24 * 3600.0
# The control plane's serving certificate: re-made at half of this.
SERVING_TTL = 30 * 24 * 3600.0
BACKDATE_MAX = 60.0
BACKDATE_RATIO = 0.02
FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
# Phases of a root rotation (control/rotation.py); "" is none running.
TRUST_BOTH, ISSUE_NEW, DROP_OLD = "trust-both", "issue-new", "drop-old"
PHASES = (TRUST_BOTH, ISSUE_NEW, DROP_OLD)


class CAError(Exception):
    """The CA cannot start or cannot sign: the reason names the file or the request."""


def spiffe_for(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"{SPIFFE}{trust_domain}/ns/{namespace}/sa/{service_account}"


def pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """A file only its owner can read, written whole or not at all (temporary + rename)."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_private(path: Path) -> bytes:
    """A key file, refused when group or others may read it (a leaked CA key is every
    identity of the mesh)."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CAError(f"{path}: a private key readable by group or others "
                          f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
        return path.read_bytes()
    except OSError as exc:
        raise CAError(f"{path}: cannot read: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Signer:
    """One signing CA: its certificate and key, its chain to the root, and the root(s)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    chain: list[x509.Certificate]  # the signing CA first, up to and including the root
    roots: list[x509.Certificate]

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1]

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root)


def self_signed_root(trust_domain: str, now: datetime.datetime) -> Signer:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, "meshproxy root CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(_serial())
            .not_valid_before(now - datetime.timedelta(seconds=BACKDATE_MAX))
            .not_valid_after(now + datetime.timedelta(seconds=ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return Signer(cert, key, [cert], [cert])


def write_signer(directory: Path, signer: Signer) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(directory / "ca-key.pem", _key_pem(signer.key))  # type: ignore[arg-type]
    _write_public(directory / "ca-cert.pem", pem([signer.cert]))
    _write_public(directory / "cert-chain.pem", pem(signer.chain))
    _write_public(directory / "root-cert.pem", pem(signer.roots))


def read_signer(directory: Path) -> Signer:
    """The four files of istiod's plugged-in layout, checked to belong together."""
    present = [f for f in FILES if (directory / f).exists()]
    if len(present) != len(FILES):
        missing = ", ".join(f for f in FILES if f not in present)
        raise CAError(f"{directory}: has {', '.join(present)} but not {missing} (a plugged-in "
                      f"CA needs all of {', '.join(FILES)})")

    def certs(name: str) -> list[x509.Certificate]:
        try:
            found = x509.load_pem_x509_certificates((directory / name).read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(f"{directory / name}: not a PEM certificate file: {exc}") from None
        if not found:
            raise CAError(f"{directory / name}: no certificate in it")
        return found

    cert = certs("ca-cert.pem")[0]
    chain, roots = certs("cert-chain.pem"), certs("root-cert.pem")
    key_path = directory / "ca-key.pem"
    try:
        key = load_key(read_private(key_path), str(key_path))
    except Exception as exc:  # TLSConfigError, with the file named
        raise CAError(str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{key_path}: an EC or RSA key is needed to sign")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise CAError(f"{key_path}: does not match {directory / 'ca-cert.pem'}")
    if chain[0] != cert:
        chain = [cert, *chain]
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAError(f"{directory / 'ca-cert.pem'}: not a CA certificate")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except Exception as exc:  # any failure to verify: not issued by it
            raise CAError(f"{directory / 'cert-chain.pem'}: {child.subject.rfc4514_string()} "
                          f"is not issued by {parent.subject.rfc4514_string()}: {exc}") from None
    if chain[-1] not in roots:
        raise CAError(f"{directory / 'cert-chain.pem'}: ends at a certificate that is not in "
                      f"{directory / 'root-cert.pem'}")
    return Signer(cert, key, chain, roots)


def _spki(pub: object) -> bytes:
    return pub.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _serial() -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; 128 random bits (CA/B forum asks 64+).
    return secrets.randbits(127) | (1 << 126)


def open_directory(directory: Path, trust_domain: str, now: datetime.datetime
                   ) -> tuple[Signer, bool]:
    """The signer of a CA directory, made (self-signed) when the directory has none:
    (signer, created)."""
    if not any((directory / f).exists() for f in FILES):
        signer = self_signed_root(trust_domain, now)
        write_signer(directory, signer)
        return signer, True
    return read_signer(directory), False


def _usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=not cert_sign, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _issue(signer: Signer, public_key: object, san: x509.SubjectAlternativeName,
           ttl: float, now: datetime.datetime, subject: x509.Name | None = None
           ) -> x509.Certificate:
    backdate = min(BACKDATE_MAX, ttl * BACKDATE_RATIO)
    not_after = now + datetime.timedelta(seconds=ttl)
    # A leaf never outlives its CA (RFC 5280 6.1.3 would fail it from then on anyway).
    not_after = min(not_after, signer.cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject or x509.Name([]))
               .issuer_name(signer.cert.subject)
               .public_key(public_key)  # type: ignore[arg-type]
               .serial_number(_serial())
               .not_valid_before(now - datetime.timedelta(seconds=backdate))
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_usage(False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False)
               # RFC 5280 4.2.1.6: with an empty subject the SAN extension is critical.
               .add_extension(san, critical=subject is None)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer.cert.public_key()), critical=False))  # type: ignore[arg-type]
    return builder.sign(signer.key, hashes.SHA256())


def sign_csr(signer: Signer, csr_pem: bytes, spiffe: str, ttl: float,
             now: datetime.datetime) -> list[x509.Certificate]:
    """A workload certificate for `spiffe` (the authenticated identity) over the CSR's
    public key, then the signer's chain. CAError when the CSR is unusable or asks for
    another identity."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise CAError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CAError("the CSR's signature does not verify (it was not made with its key)")
    pub = csr.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ("secp256r1", "secp384r1"):
            raise CAError(f"the CSR's key is on curve {pub.curve.name}; P-256 or P-384 only")
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise CAError(f"the CSR's RSA key has {pub.key_size} bits; 2048 at least")
    else:
        raise CAError(f"the CSR's key type {type(pub).__name__} is not signed here")
    try:
        asked = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        asked = None
    if asked is not None:
        names = [str(n.value) for n in asked]
        if names != [spiffe]:
            raise CAError(f"the CSR asks for {', '.join(names)}; this workload is {spiffe} "
                          f"(the identity comes from its token, not from the CSR)")
    if not 0 < ttl <= MAX_LEAF_TTL:
        raise CAError(f"a lifetime of {ttl:.0f} s is outside (0, {MAX_LEAF_TTL:.0f}] s")
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)])
    return [_issue(signer, pub, san, ttl, now), *signer.chain]


def serving_certificate(signer: Signer, names: list[str], now: datetime.datetime,
                        ttl: float = SERVING_TTL) -> tuple[bytes, bytes]:
    """The control plane's own certificate (chain PEM, key PEM) for its DNS names and IP
    addresses, so a proxy verifies whom it sends its token to."""
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    general: list[x509.GeneralName] = []
    for n in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            general.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = _issue(signer, key.public_key(), x509.SubjectAlternativeName(general), ttl, now,
                  subject)
    return pem([cert, *signer.chain]), _key_pem(key)



class Authority:
    """One replica's CA: the signer in service, the next root while a rotation runs, and
    the phase (the store says which; control/rotation.py moves it)."""

    def __init__(self, directory: Path, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 leaf_ttl: float = DEFAULT_LEAF_TTL,
                 now: datetime.datetime | None = None) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.leaf_ttl = leaf_ttl
        self.phase = ""
        self.current, self.created = open_directory(
            directory, trust_domain, now or datetime.datetime.now(datetime.UTC))
        self.next: Signer | None = None
        if (directory / "next").exists():
            self.next = read_signer(directory / "next")

    def reload(self) -> None:
        """Read the directory again (another replica finished or began a rotation)."""
        self.current = read_signer(self.directory)
        nxt = self.directory / "next"
        self.next = read_signer(nxt) if nxt.exists() else None

    def signer(self) -> Signer:
        if self.phase in (ISSUE_NEW, DROP_OLD) and self.next is not None:
            return self.next
        return self.current

    def roots(self) -> list[x509.Certificate]:
        """The trust bundle workloads are given now."""
        if self.next is None or not self.phase:
            return list(self.current.roots)
        if self.phase == DROP_OLD:
            return list(self.next.roots)
        return list(self.current.roots) + [r for r in self.next.roots
                                           if r not in self.current.roots]

    def bundle(self) -> bytes:
        return pem(self.roots())

    def spiffe(self, namespace: str, service_account: str) -> str:
        return spiffe_for(self.trust_domain, namespace, service_account)

    def sign(self, csr_pem: bytes, namespace: str, service_account: str, ttl: float,
             now: datetime.datetime) -> list[x509.Certificate]:
        ttl = min(ttl, self.leaf_ttl) if ttl > 0 else self.leaf_ttl
        return sign_csr(self.signer(), csr_pem, self.spiffe(namespace, service_account),
                        ttl, now)

    def prepare_next(self, now: datetime.datetime) -> Signer:
        """The root a rotation moves to: `next/` when an operator put one there (their own
        plugged-in files), else a new self-signed root written there."""
        if self.next is None:
            signer = self_signed_root(self.trust_domain, now)
            write_signer(self.directory / "next", signer)
            self.next = signer
        return self.next

    def promote(self) -> None:
        """The end of a rotation: `next/` becomes the directory's CA, the old files go to
        retired/<fingerprint>/. Idempotent (a replica that finds it done just reloads)."""
        nxt = self.directory / "next"
        if nxt.exists():
            retired = self.directory / "retired" / self.current.root_fingerprint
            retired.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in FILES:
                os.replace(self.directory / name, retired / name)
            for name in FILES:
                os.replace(nxt / name, self.directory / name)
            nxt.rmdir()
        self.phase = ""
        self.reload()
