from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Origin, Proxy
from tests.mesh import ControlPlane, Sidecar, stop_all
from tests.netns import net  # noqa: F401  (the network namespaces fixture)


@pytest.fixture(autouse=True)
def _stop_proxies_of_the_test():
    """A test that fails half-way must not leave a proxy running (and serving, probing
    health, holding ports) into the tests after it. Module-scoped proxies are kept."""
    before = len(Proxy.started)
    before_cp, before_sc = len(ControlPlane.started), len(Sidecar.started)
    yield
    for p in Proxy.started[before:]:
        if not getattr(p, "module_scoped", False):
            p.stop()
    stop_all(before_cp, before_sc)


@pytest.fixture
def origin_factory() -> Iterator[Callable[..., Origin]]:
    origins: list[Origin] = []

    def make(handler=None) -> Origin:
        o = Origin(handler) if handler is not None else Origin()
        origins.append(o.start())
        return o

    yield make
    for o in origins:
        o.stop()


@pytest.fixture
def origin(origin_factory) -> Origin:
    return origin_factory()


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    proxies: list[Proxy] = []

    def start(config: dict, *args: str) -> Proxy:
        p = Proxy(config, tmp_path, args)
        proxies.append(p)
        return p

    yield start
    for p in proxies:
        p.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One origin (handler switchable per test) behind one proxy, for a module's tests."""
    from tests.helpers import config

    o = Origin().start()
    log = tmp_path_factory.mktemp("log") / "access.log"
    p = Proxy(config(o.port, access_log={"path": str(log), "format": "json",
                                         "flush_interval": "50ms"}),
              tmp_path_factory.mktemp("proxy"))
    p.module_scoped = True
    p.access_log = log
    yield o, p
    p.stop()
    o.stop()


@pytest.fixture
def env(shared):
    o, p = shared
    from tests.helpers import echo_handler

    o.handler = echo_handler
    o.requests.clear()
    return o, p
