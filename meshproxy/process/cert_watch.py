"""TLS material: read once, checked, watched for rotation (the supervisor's side).

Rules:
- The supervisor reads every certificate, key and bundle file the config names (once per
  config version or rotation), builds the very contexts the workers will build from those
  bytes, and only then sends the bytes on. A file that cannot be used refuses the config
  (at start or reload) or the rotation, naming the field and the file; the old material
  stays in service.
- Rotation: each file's (inode, mtime, size) is looked at every POLL_INTERVAL. Tools that
  rotate certificates (cert-manager, SPIRE helpers, `mv` of a new file) replace files
  atomically by rename, which changes the inode, so a stat is enough; nothing is read until
  something changed. When the chain and key are replaced one after the other, the first
  look may see a new chain with the old key: that is refused (logged) and the next change
  is tried again.
- New handshakes use new material as soon as the workers have the snapshot; connections
  already established keep the SSL objects they were made with.
- Secrets (names starting `sds:`, process/identity.py) are no files: the control plane's CA
  issued them and the supervisor holds them in memory; a config naming one it does not
  have yet is refused like a missing file, and its rotation is the supervisor installing a
  new identity (the same snapshot path).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshproxy.config import schema
from meshproxy.config.compile import listener_tls, upstream_tls
from meshproxy.config.load import tls_files
from meshproxy.transport.tls_context import ClientTLS, ServerTLS
from meshproxy.transport.tls_material import TLSConfigError, describe_cert, load_chain

# Within a second of an atomic replace, new handshakes use the new material: a poll every
# quarter second plus a snapshot round trip to the workers (a few milliseconds).
POLL_INTERVAL = 0.25

Stamp = tuple[int, int, int]


def stamp(path: str) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class Material:
    """The material of one config: file bytes, and the stamps they were read under."""

    files: dict[str, bytes] = field(default_factory=dict)
    stamps: dict[str, Stamp | None] = field(default_factory=dict)


SECRET = "sds:"


def load(config: schema.Config, secrets: dict[str, bytes] | None = None
         ) -> tuple[Material, list[str]]:
    """Read and check the TLS files of `config` (and take its secrets from `secrets`):
    (material, errors naming the fields)."""
    mat = Material()
    errors: list[str] = []
    for where, path in tls_files(config):
        if path in mat.files:
            continue
        if path.startswith(SECRET):
            found = (secrets or {}).get(path)
            if found is None:
                errors.append(f"{where}: secret {path!r} is not issued yet (the mesh "
                              "identity comes from the control plane's CA)")
            else:
                mat.files[path] = found
            continue
        mat.stamps[path] = stamp(path)  # before reading: a change after it is seen next time
        try:
            with open(path, "rb") as f:
                mat.files[path] = f.read()
        except OSError as exc:
            errors.append(f"{where}: cannot read {path!r}: {exc.strerror or exc}")
    if errors:
        return mat, errors
    # Build every context the workers will build, from the same bytes.
    checks: list[tuple[str, Callable[[Any], object], object]] = [
        (f"listeners[{i}].tls", ServerTLS.from_spec, listener_tls(lst.tls, mat.files))
        for i, lst in enumerate(config.listeners)]
    checks += [(f"clusters[{i}].tls", ClientTLS.from_spec, upstream_tls(c.tls, mat.files))
               for i, c in enumerate(config.clusters)]
    for where, build, spec in checks:
        if spec is not None:
            try:
                build(spec)
            except TLSConfigError as exc:
                errors.append(f"{where}: {exc}")
    return mat, errors


def changed(mat: Material) -> bool:
    return any(stamp(path) != st for path, st in mat.stamps.items())


def current_stamps(mat: Material) -> dict[str, Stamp | None]:
    return {path: stamp(path) for path in mat.stamps}


def certs_report(config: schema.Config, mat: Material) -> dict[str, object]:
    """Envoy's /certs: per TLS context, its trust bundle and its certificate chain, each
    certificate with its SPIFFE ID, serial and days until expiry (of the material in
    service, not of whatever is on disk now)."""
    now = datetime.datetime.now(datetime.UTC)

    def certs(path: str | None) -> list[dict[str, object]]:
        if path is None or path not in mat.files:
            return []
        try:
            return [describe_cert(c, path, now) for c in load_chain(mat.files[path], path)]
        except TLSConfigError:
            return []

    out = []
    for lst in config.listeners:
        if lst.tls is not None:
            out.append({"listener": lst.name,
                        "ca_cert": certs(lst.tls.trusted_ca),
                        "cert_chain": [c for cert in lst.tls.certificates
                                       for c in certs(cert.certificate_chain)]})
    for c in config.clusters:
        if c.tls is not None:
            out.append({"cluster": c.name, "ca_cert": certs(c.tls.trusted_ca),
                        "cert_chain": certs(c.tls.certificate_chain)})
    return {"certificates": out}
