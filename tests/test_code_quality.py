"""The rules of DESIGN.md that a tool can check: ruff and mypy clean, sans-IO cores."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = ["meshproxy/_core", "meshproxy/config", "meshproxy/protocol"]
FORBIDDEN = {"trio", "socket", "select", "selectors", "asyncio", "time", "threading"}


def _imports_py(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _imports_pyx(path: Path) -> set[str]:
    found = re.findall(r"^\s*(?:from|c?import)\s+([A-Za-z_][\w]*)", path.read_text(), re.M)
    return set(found)


@pytest.mark.parametrize("folder", SANS_IO)
def test_code_quality_sans_io_cores_import_no_io(folder: str) -> None:
    files = list((ROOT / folder).glob("*.py")) + list((ROOT / folder).glob("*.pyx"))
    assert files
    for f in files:
        used = _imports_pyx(f) if f.suffix == ".pyx" else _imports_py(f)
        assert not used & FORBIDDEN, f"{f.relative_to(ROOT)} imports {used & FORBIDDEN}"


def test_code_quality_core_modules_have_pxd_and_pyi() -> None:
    for pyx in (ROOT / "meshproxy/_core").glob("*.pyx"):
        assert pyx.with_suffix(".pxd").exists(), pyx
        assert pyx.with_suffix(".pyi").exists(), pyx


def test_code_quality_ruff_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "meshproxy", "tests", "bench",
                        "tools"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_code_quality_mypy_clean() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
