"""The CA (control/ca.py), join tokens (control/tokens.py) and the proxy's identity
decisions (process/identity.py), without processes: bytes and clocks in, certificates and
decisions out."""

from __future__ import annotations

import datetime
import os
import random
import re
import stat
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshproxy.control import ca, rotation
from meshproxy.control.tokens import TokenError, TokenKey
from meshproxy.process import identity

NOW = datetime.datetime(2026, 12, 2, tzinfo=datetime.UTC)


def _csr(key=None, san: str | None = None) -> tuple[bytes, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if san is not None:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(san)]), critical=False)
    csr = b.sign(key, hashes.SHA256())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, csr.public_bytes(serialization.Encoding.PEM)


def test_ca_self_signed_root_is_made_once_with_a_private_key_file(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", now=NOW)
    assert a.created
    mode = stat.S_IMODE((tmp_path / "ca" / "ca-key.pem").stat().st_mode)
    assert mode == 0o600
    again = ca.Authority(tmp_path / "ca", now=NOW)
    assert not again.created
    assert again.current.root_fingerprint == a.current.root_fingerprint


def test_ca_refuses_a_key_file_others_can_read(tmp_path: Path) -> None:
    ca.Authority(tmp_path / "ca", now=NOW)
    os.chmod(tmp_path / "ca" / "ca-key.pem", 0o644)
    with pytest.raises(ca.CAError, match="readable by group or others"):
        ca.Authority(tmp_path / "ca", now=NOW)


def test_ca_refuses_a_partial_plugged_in_directory(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(b"x")
    with pytest.raises(ca.CAError, match=re.escape("not ca-key.pem, cert-chain.pem, root-cert.pem")):
        ca.Authority(d, now=NOW)


def test_ca_signs_with_a_plugged_in_intermediate(tmp_path: Path) -> None:
    root = trustme.CA()
    inter = root.create_child_ca()
    d = tmp_path / "ca"
    d.mkdir()
    (d / "ca-cert.pem").write_bytes(inter.cert_pem.bytes())
    key = d / "ca-key.pem"
    key.write_bytes(inter.private_key_pem.bytes())
    os.chmod(key, 0o600)
    (d / "cert-chain.pem").write_bytes(inter.cert_pem.bytes() + root.cert_pem.bytes())
    (d / "root-cert.pem").write_bytes(root.cert_pem.bytes())
    a = ca.Authority(d, now=NOW)
    assert not a.created
    _, csr = _csr()
    chain = a.sign(csr, "shop", "web", 0, datetime.datetime.now(datetime.UTC))
    assert len(chain) == 3
    chain[0].verify_directly_issued_by(chain[1])
    chain[1].verify_directly_issued_by(chain[2])
    assert chain[2] == x509.load_pem_x509_certificate(root.cert_pem.bytes())


def test_ca_leaf_carries_only_the_authenticated_identity(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", trust_domain="example.org", leaf_ttl=3600, now=NOW)
    _, csr = _csr()
    leaf = a.sign(csr, "shop", "web", 0, NOW)[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/ns/shop/sa/web"]
    assert san.value.get_values_for_type(x509.DNSName) == []
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not bc.ca
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert life == datetime.timedelta(seconds=3600 + 60)  # backdated 60 s for skew
    leaf.verify_directly_issued_by(a.current.cert)


def test_ca_refuses_a_csr_asking_for_another_identity(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", now=NOW)
    _, csr = _csr(san="spiffe://cluster.local/ns/shop/sa/admin")
    with pytest.raises(ca.CAError, match=re.escape("asks for spiffe://cluster.local/ns/shop/sa/admin")):
        a.sign(csr, "shop", "web", 0, NOW)
    _, same = _csr(san="spiffe://cluster.local/ns/shop/sa/web")
    assert a.sign(same, "shop", "web", 0, NOW)  # asking for its own is fine


def test_ca_refuses_weak_or_unsigned_csrs(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", now=NOW)
    _, weak = _csr(rsa.generate_private_key(65537, 1024))
    with pytest.raises(ca.CAError, match="2048 at least"):
        a.sign(weak, "shop", "web", 0, NOW)
    with pytest.raises(ca.CAError, match="not a PEM"):
        a.sign(b"hello", "shop", "web", 0, NOW)


def test_ca_caps_the_lifetime_asked_for(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", leaf_ttl=100, now=NOW)
    _, csr = _csr()
    leaf = a.sign(csr, "shop", "web", 10_000, NOW)[0]
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(seconds=100)
    short = a.sign(csr, "shop", "web", 20, NOW)[0]
    # 2% of 20 s backdated, not 60 s: a short test lifetime is not half gone at issuance
    # (X.509 times have whole seconds: 0.4 s earlier is written as the second before).
    assert short.not_valid_before_utc == NOW - datetime.timedelta(seconds=1)


def test_ca_rotation_bundles_and_signers_by_phase(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", now=NOW)
    old = a.current.root_fingerprint
    new = a.prepare_next(NOW).root_fingerprint
    assert old != new
    fps = lambda: [ca.fingerprint(r) for r in a.roots()]  # noqa: E731
    assert fps() == [old] and a.signer().root_fingerprint == old
    a.phase = ca.TRUST_BOTH
    assert fps() == [old, new] and a.signer().root_fingerprint == old
    a.phase = ca.ISSUE_NEW
    assert fps() == [old, new] and a.signer().root_fingerprint == new
    a.phase = ca.DROP_OLD
    assert fps() == [new] and a.signer().root_fingerprint == new
    a.promote()
    assert a.phase == "" and fps() == [new] and a.next is None
    assert (tmp_path / "ca" / "retired" / old / "ca-key.pem").exists()
    assert ca.Authority(tmp_path / "ca", now=NOW).current.root_fingerprint == new


def test_rotation_waits_for_every_connected_proxy_with_an_identity() -> None:
    recs = [
        {"node": "a", "status": "SYNCED", "spiffe_id": "x", "bundle": "B2",
         "identity_root": "R1"},
        {"node": "b", "status": "SYNCED", "spiffe_id": "y", "bundle": "B1",
         "identity_root": "R2"},
        {"node": "c", "status": "DISCONNECTED", "spiffe_id": "z", "bundle": "B1"},
        {"node": "d", "status": "SYNCED", "spiffe_id": "", "bundle": ""},
    ]
    assert rotation.holding(ca.TRUST_BOTH, recs, "B2", "R2") == ["b"]
    assert rotation.holding(ca.ISSUE_NEW, recs, "B2", "R2") == ["a"]
    assert rotation.holding(ca.DROP_OLD, recs, "B1", "R2") == ["a"]
    assert rotation.following(ca.TRUST_BOTH) == ca.ISSUE_NEW
    assert rotation.following(ca.DROP_OLD) == rotation.DONE


def test_tokens_verify_and_refuse(tmp_path: Path) -> None:
    key = TokenKey.open(tmp_path / "token-key.pem")
    assert stat.S_IMODE((tmp_path / "token-key.pem").stat().st_mode) == 0o600
    t = key.create("shop", "web", "spiffe://cluster.local/ns/shop/sa/web", 60, 1000.0)
    c = key.verify(t, 1030.0)
    assert (c.namespace, c.service_account) == ("shop", "web")
    with pytest.raises(TokenError, match="expired"):
        key.verify(t, 1061.0)
    head, claims, sig = t.split(".")
    forged_claims = claims[:-2] + ("AA" if claims[-2:] != "AA" else "BB")
    with pytest.raises(TokenError):
        key.verify(f"{head}.{forged_claims}.{sig}", 1030.0)
    other = TokenKey.open(tmp_path / "other.pem")
    with pytest.raises(TokenError, match="another key"):
        key.verify(other.create("shop", "web", "s", 60, 1000.0), 1030.0)
    import base64
    import json
    none = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": key.kid}).encode()
                                    ).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="ES256 only"):
        key.verify(f"{none}.{claims}.", 1030.0)
    assert TokenKey.open(tmp_path / "token-key.pem").verify(t, 1030.0)  # reloaded key


def test_identity_accepts_only_a_chain_for_its_key(tmp_path: Path) -> None:
    a = ca.Authority(tmp_path / "ca", now=NOW)
    key_pem, csr = identity.new_request()
    assert b"PRIVATE KEY" in key_pem and b"CERTIFICATE REQUEST" in csr
    now = datetime.datetime.now(datetime.UTC)
    chain = ca.pem(a.sign(csr, "shop", "web", 0, now))
    got = identity.accept(chain, key_pem, a.bundle())
    assert got.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
    assert got.root == a.current.root_fingerprint
    life = got.not_after - got.not_before
    assert got.not_before + 0.49 * life <= got.renew_at <= got.not_before + 0.51 * life
    other_key, _ = identity.new_request()
    with pytest.raises(identity.IdentityError, match="not for this proxy's key"):
        identity.accept(chain, other_key, a.bundle())
    foreign = ca.Authority(tmp_path / "ca2", now=NOW)
    with pytest.raises(identity.IdentityError, match="does not lead to a root"):
        identity.accept(chain, key_pem, foreign.bundle())


def test_identity_renewal_spread_and_retry_backoff() -> None:
    rng = random.Random(7)
    times = [identity.renew_time(0.0, 86400.0, rng) for _ in range(1000)]
    assert min(times) >= 0.49 * 86400 and max(times) <= 0.51 * 86400
    assert max(times) - min(times) > 0.015 * 86400  # spread over most of the +-1%
    delays = [identity.retry_delay(n, 0.0, None, rng) for n in range(10)]
    assert delays[0] <= 1.0 and max(delays) <= identity.RETRY_CAP
    # Close to expiry the back-off shrinks: several tries fit in what is left.
    assert identity.retry_delay(9, 0.0, 8.0, rng) <= 2.0
