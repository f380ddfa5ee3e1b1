"""The operator API of a real `meshproxy control` process, over HTTP on loopback, on both
stores: refuses a missing or wrong token, an invalid resource (every error with its field
path) and a stale resourceVersion (409); stores, lists, replaces and deletes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, Etcd
from tests.mesh import ControlPlane, call
from tests.unit.test_control_resources import EXAMPLES


@pytest.fixture(params=["sqlite", "etcd"])
def control(request, tmp_path: Path):
    etcd = None
    store = None
    if request.param == "etcd":
        etcd = Etcd(tmp_path / "etcd").start()
        store = etcd.url
    cp = ControlPlane(tmp_path / "cp", store)
    try:
        yield cp.url
    finally:
        cp.stop()
        if etcd is not None:
            etcd.stop()


def route_doc() -> dict:
    from meshproxy.control.resources import load_documents

    return next(d for d in load_documents(EXAMPLES) if d["kind"] == "Route")


ROUTE = "/apis/mesh/v1/namespaces/shop/routes/reviews"


def test_control_api_refuses_without_the_token(control) -> None:
    assert call(control, "GET", "/apis/mesh/v1/routes", token=None)[0] == 401
    status, body = call(control, "GET", "/apis/mesh/v1/routes", token="guess")
    assert status == 401 and "bearer token" in body["error"]


def test_control_api_stores_lists_replaces_and_deletes(control) -> None:
    status, created = call(control, "POST", "/apis/mesh/v1/namespaces/shop/routes", route_doc())
    assert status == 201
    rv = created["metadata"]["resourceVersion"]
    assert call(control, "POST", "/apis/mesh/v1/namespaces/shop/routes", route_doc())[0] == 409
    status, got = call(control, "GET", ROUTE)
    assert status == 200 and got["metadata"]["resourceVersion"] == rv
    assert got["spec"]["rules"][1]["destinations"][0]["weight"] == 90
    # A replace that names the version it read succeeds once; the second, stale, is 409.
    doc = dict(got)
    doc["spec"]["rules"][1]["destinations"][0]["weight"] = 80
    status, replaced = call(control, "PUT", ROUTE, doc)
    assert status == 200 and int(replaced["metadata"]["resourceVersion"]) > int(rv)
    status, body = call(control, "PUT", ROUTE, doc)
    assert status == 409 and "changed" in body["error"]
    status, listed = call(control, "GET", "/apis/mesh/v1/routes")
    assert [i["metadata"]["name"] for i in listed["items"]] == ["reviews"]
    assert listed["items"][0]["spec"]["rules"][1]["destinations"][0]["weight"] == 80
    assert call(control, "GET", "/apis/mesh/v1/namespaces/other/routes")[1]["items"] == []
    stale = call(control, "DELETE", f"{ROUTE}?resourceVersion={rv}")
    assert stale[0] == 409
    assert call(control, "DELETE", ROUTE)[0] == 200
    assert call(control, "GET", ROUTE)[0] == 404
    assert call(control, "DELETE", ROUTE)[0] == 404


def test_control_api_refuses_an_invalid_resource_with_field_paths(control) -> None:
    doc = route_doc()
    doc["spec"]["rules"][0]["destinations"] = []
    doc["spec"]["rules"][1]["timeuot"] = "1s"
    status, body = call(control, "PUT", ROUTE, doc)
    assert status == 400
    assert "spec.rules[0].destinations: expected array of length >= 1" in body["errors"]
    assert "spec.rules[1].timeuot: unknown field" in body["errors"]
    assert call(control, "GET", ROUTE)[0] == 404  # nothing was stored
    wrong_place = route_doc()
    status, body = call(control, "PUT", "/apis/mesh/v1/namespaces/other/routes/reviews",
                        wrong_place)
    assert status == 400 and any("metadata.namespace" in e for e in body["errors"])
    assert call(control, "GET", "/apis/mesh/v1/gateways")[0] == 404


def test_control_cli_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "meshproxy", "control", "--store",
                        f"sqlite:///{tmp_path / 'cp.db'}"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--token-file" in r.stderr
    (tmp_path / "empty").write_text("\n")
    r = subprocess.run([sys.executable, "-m", "meshproxy", "control", "--token-file",
                        str(tmp_path / "empty")], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "is empty" in r.stderr
