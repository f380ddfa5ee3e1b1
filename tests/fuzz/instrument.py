"""A compiled module of meshproxy._core built a second time for coverage-guided fuzzing,
and loaded in its place (tests/fuzz/fuzz_*.py).

The module's C (Cython's output) is compiled with clang and `-fsanitize=fuzzer-no-link`
(atheris's documented way for native extensions) into build/fuzz/, so that libFuzzer sees
its branches and comparisons; the regular build is not touched. The modules it cimports
are the regular ones (not instrumented)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import atheris

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "fuzz"


def build(name: str) -> Path:
    """meshproxy/_core/<name> instrumented, rebuilt when its .pyx or .pxd is newer."""
    pyx = ROOT / "meshproxy" / "_core" / f"{name}.pyx"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out = BUILD / f"{name}{suffix}"
    sources = [p for p in (pyx, pyx.with_suffix(".pxd")) if p.exists()]
    if out.exists() and out.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    c_file = BUILD / f"{name}.{os.getpid()}.c"
    # From the tree's root, so that `cimport meshproxy._core.<other>` resolves.
    subprocess.run([sys.executable, "-m", "cython", "-3", "-o", str(c_file),
                    str(pyx.relative_to(ROOT))], check=True, cwd=ROOT)
    include = sysconfig.get_paths()["include"]
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(["clang", "-shared", "-fPIC", "-O1", "-g", "-fsanitize=fuzzer-no-link",
                    f"-I{include}", str(c_file), "-o", str(tmp)], check=True)
    os.replace(tmp, out)  # a campaign running meanwhile keeps the file it loaded
    c_file.unlink()
    return out


def libfuzzer() -> Path:
    """libFuzzer as a shared library, made from the archive atheris ships for this purpose
    (its "external libFuzzer" option): loaded globally before the instrumented module, it
    defines the coverage hooks the module calls, and atheris then drives it ("Using
    preloaded libfuzzer") instead of the copy inside its own extension."""
    out = BUILD / "libfuzzer.so"
    if not out.exists():
        archive = Path(atheris.path()) / "libclang_rt.fuzzer_no_main.a"
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(["clang++", "-shared", "-o", str(out), "-Wl,--whole-archive",
                        str(archive), "-Wl,--no-whole-archive", "-lpthread"], check=True)
    return out


def instrumented(name: str) -> ModuleType:
    """The instrumented meshproxy._core.<name>, loaded as that module."""
    path = build(name)
    ctypes.CDLL(str(libfuzzer()), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    full = f"meshproxy._core.{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)
    return module
