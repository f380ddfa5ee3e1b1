"""Build the compiled hot path with one set of directives: every meshproxy/_core/*.pyx (the
sans-IO cores), meshproxy/transport/*.pyx (the TLS record layer) and meshproxy/proxy/*.pyx
(the fast path that drives them from the reactor)."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

# One directives dict for every module: the hot path trades Python's safety nets for speed,
# so each module is written to index only within bounds it has checked itself.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(f"meshproxy.{package}.{path.stem}", [str(path)], extra_compile_args=["-O2"])
    for package in ("_core", "transport", "proxy")
    for path in sorted(Path(f"meshproxy/{package}").glob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, quiet=True))
