"""Make a mesh CA and SPIFFE workload certificates (for trying mTLS, and for the tests).

    python -m tools.mesh_certs --out certs --trust-domain cluster.local \\
        --workload web:default:web --workload api:default:api --server-name localhost

writes certs/ca.pem, and per workload <name>.pem (chain) and <name>-key.pem, with the URI SAN
spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (Istio's shape) and, for
--server-name, a DNS SAN. Workload certificates allow both serverAuth and clientAuth, as
Istio's do. Not a production CA: the control plane's CA issues and rotates those.
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    chain: Path
    key: Path
    cert: x509.Certificate


class MeshCA:
    """A self-signed root; `issue` signs leaf certificates with any SANs, usages and
    validity (so that tests can make expired, wrong-purpose and wrong-SAN ones too)."""

    def __init__(self, name: str = "meshproxy test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - DAY).not_valid_after(_now() + 3650 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.pem())
        return path

    def crl(self, revoked: list[x509.Certificate], path: Path) -> Path:
        """A revocation list (PEM) signed by this CA naming `revoked`."""
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - DAY).next_update(_now() + 7 * DAY))
        for cert in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                .revocation_date(_now() - DAY).build())
        path.write_bytes(builder.sign(self.key, hashes.SHA256())
                         .public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, out: Path, name: str, *, dns: list[str] | None = None,
              uris: list[str] | None = None, usages: tuple[str, ...] = ("server", "client"),
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
        sans += [x509.UniformResourceIdentifier(u) for u in uris or []]
        ekus = [{"server": ExtendedKeyUsageOID.SERVER_AUTH,
                 "client": ExtendedKeyUsageOID.CLIENT_AUTH}[u] for u in usages]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _now() - DAY)
            .not_valid_after(not_after or _now() + 90 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        out.mkdir(parents=True, exist_ok=True)
        chain, key_path = out / f"{name}.pem", out / f"{name}-key.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return Issued(chain, key_path, cert)


def spiffe(trust_domain: str, namespace: str, account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.mesh_certs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trust-domain", default="cluster.local")
    ap.add_argument("--workload", action="append", default=[],
                    help="name:namespace:service-account (repeatable)")
    ap.add_argument("--server-name", action="append", default=[],
                    help="DNS SAN added to every workload certificate")
    args = ap.parse_args(argv)
    ca = MeshCA()
    args.out.mkdir(parents=True, exist_ok=True)
    ca.write(args.out / "ca.pem")
    for spec in args.workload:
        name, ns, sa = spec.split(":")
        issued = ca.issue(args.out, name, dns=args.server_name,
                          uris=[spiffe(args.trust_domain, ns, sa)])
        print(f"{issued.chain} {issued.key} {spiffe(args.trust_domain, ns, sa)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
