"""A short coverage-guided fuzz run of the compiled HTTP/1.1 parser and HTTP/2 server
connection in every test run (about 10 s per target), so that a regression of the
smuggling or crash class shows in CI. The long
campaigns are run by hand (README, "Fuzzing"); what they find goes to tests/corpus/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module,target", [
    ("fuzz_http1", "request"), ("fuzz_http1", "response"), ("fuzz_http1", "chunked"),
    ("fuzz_h2_server", ""),
])
def test_fuzz_short_run_finds_nothing(tmp_path: Path, module: str, target: str) -> None:
    env = dict(os.environ, MESHPROXY_FUZZ_TARGET=target)
    r = subprocess.run(
        [sys.executable, "-m", f"tests.fuzz.{module}", "-max_total_time=10",
         "-max_len=4096", "-print_final_stats=1", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    # atheris prints the Python traceback on stdout and libFuzzer its log on stderr: both
    # tails, and the input that failed (written as crash-<sha1> where the run happened).
    crash = re.search(r"Test unit written to (\S+)", r.stderr)
    found = ""
    if crash:
        unit = ROOT / "build" / "fuzz" / crash.group(1)
        found = f"\n--- failing input ---\n{unit.read_bytes()!r}" if unit.exists() else ""
    assert r.returncode == 0, (r.stdout[-3000:] + "\n--- stderr ---\n" + r.stderr[-1500:]
                               + found)
    runs = int(re.search(r"stat::number_of_executed_units:\s+(\d+)", out).group(1))
    assert runs > 10_000, out[-2000:]  # it really ran, instrumented and seeded
    assert re.search(r"INFO: Loaded 1 modules\s+\(\d+ inline 8-bit counters\)", out), out[:2000]
