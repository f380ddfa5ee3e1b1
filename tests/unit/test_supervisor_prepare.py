"""The supervisor compiles every snapshot before any worker sees it (startup, reload,
rotation): one that does not compile is refused and the running one stays."""

from __future__ import annotations

import msgspec

from meshproxy.config import schema
from meshproxy.config.load import decode
from meshproxy.process.supervisor import Options, Supervisor
from tests.helpers import config


def test_supervisor_refuses_a_snapshot_that_does_not_compile(tmp_path) -> None:
    good = decode(config(8080), "good")
    sup = Supervisor(tmp_path / "mesh.json", good, Options(workers=1))
    try:
        version, message = sup.version, sup.message
        # What the config checks let through by mistake (here, one built without them): a
        # regex the route table cannot compile. Workers would crash on it, one by one.
        doc = config(8080, routes=[{"match": {"regex": r"/\N{DIGIT ONE}"},
                                    "route": {"cluster": "web"}}])
        bad = msgspec.convert(doc, schema.Config)
        errors = sup._prepare(bad)
        assert errors and "does not compile" in errors[0] and "bad escape" in errors[0]
        assert (sup.version, sup.message) == (version, message)  # nothing adopted
        assert sup._prepare(good) == [] and sup.version == version + 1
    finally:
        for sock in sup.reserved.values():
            sock.close()
