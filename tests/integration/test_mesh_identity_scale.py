"""200 sidecars joining together spread their renewals: 200 discovery clients (the
sidecar's own code, process/discovery_client.py, with its identity manager; the worker pool
left out so that 200 fit on this machine; bench/identity.py drives them) against a real `meshproxy control`, all started
at once. Each gets its certificate, and the renewal times they chose are measured: within
50% +- 1% of the lifetime, spread over that window rather than bunched."""

from __future__ import annotations

from pathlib import Path

import trio

from bench.identity import join_all
from tests.mesh import ControlPlane

SIDECARS = 200


def test_two_hundred_sidecars_started_together_spread_their_renewals(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp", None, "--workload-cert-ttl", "1h")
    token = cp.join_token("default", "web")
    bundle = cp.bundle().read_bytes()
    issued, took = trio.run(join_all, cp.secure_url, token, bundle, SIDECARS, "default",
                            "web", 60.0)
    ratios = sorted((i.renew_at - i.not_before) / (i.not_after - i.not_before)
                    for i in issued.values())
    spread = ratios[-1] - ratios[0]
    renewals = sorted(i.renew_at for i in issued.values())
    print(f"\n{SIDECARS} sidecars issued in {took:.2f} s; renewal at {ratios[0]:.4f}.."
          f"{ratios[-1]:.4f} of the lifetime (spread {spread:.2%} of it, "
          f"{renewals[-1] - renewals[0]:.1f} s for 1 h leaves)")
    assert len({i.serial for i in issued.values()}) == SIDECARS
    assert ratios[0] >= 0.49 and ratios[-1] <= 0.51
    # Uniform over +-1%: 200 draws cover most of the 2% window; none bunch in one place.
    assert spread > 0.015
    buckets = [0] * 10
    for r in ratios:
        buckets[min(9, int((r - 0.49) / 0.002))] += 1
    assert max(buckets) < SIDECARS * 0.25, buckets
    assert cp.metrics()["citadel_server_success_cert_issuance_count"] == SIDECARS
