"""Config decoding: every error reported with its field path; cross-field rules."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshproxy.config.compile import compile_config
from meshproxy.config.durations import parse_duration
from meshproxy.config.load import ConfigError, decode, load_file, parse_text

ISSUE_EXAMPLE = """
admin: {address: 127.0.0.1, port: 9901}
listeners:
  - name: ingress
    address: 127.0.0.1
    port: 10000
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {prefix: /}
            route: {cluster: web}
clusters:
  - name: web
    connect_timeout: 1s
    endpoints: [{address: 127.0.0.1, port: 8080}]
"""


def raw() -> dict:
    return parse_text(ISSUE_EXAMPLE)


def errors_of(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        decode(doc)
    return info.value.errors


def test_config_load_issue_example_decodes_and_compiles() -> None:
    cfg = decode(raw())
    assert cfg.listeners[0].virtual_hosts[0].routes[0].route.cluster == "web"
    snap = compile_config(cfg)
    assert snap.clusters["web"].connect_timeout == 1.0
    assert snap.listeners[0].max_header_bytes == 60 * 1024


def test_config_load_reports_every_structural_error_with_path() -> None:
    doc = raw()
    routes = doc["listeners"][0]["virtual_hosts"][0]["routes"]
    routes += [{"match": {"prefix": "/b"}, "route": {"cluster": "web"}},
               {"match": {"prefix": 1}, "route": {"cluster": "web"}}]
    doc["listeners"][0]["typo"] = True
    doc["clusters"][0]["endpoints"][0]["port"] = 70000
    del doc["clusters"][0]["name"]
    errs = errors_of(doc)
    assert "listeners[0].virtual_hosts[0].routes[2].match.prefix: expected str, got int" in errs
    assert "listeners[0].typo: unknown field" in errs
    assert "clusters[0].endpoints[0].port: expected int <= 65535" in errs
    assert "clusters[0].name: missing required field" in errs
    assert len(errs) == 4


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["listeners"][0]["virtual_hosts"][0]["routes"][0]["route"].update(cluster="nope"),
     "listeners[0].virtual_hosts[0].routes[0].route.cluster: unknown cluster 'nope'"),
    (lambda d: d["listeners"][0]["virtual_hosts"][0]["routes"][0].update(
        direct_response={"status": 200}),
     "listeners[0].virtual_hosts[0].routes[0]: exactly one of route, redirect, direct_response"),
    (lambda d: d["listeners"][0]["virtual_hosts"][0]["routes"][0]["match"].update(path="/x"),
     "listeners[0].virtual_hosts[0].routes[0].match: exactly one of prefix, path, regex"),
    (lambda d: d["listeners"][0]["virtual_hosts"][0]["routes"][0]["match"].update(
        prefix=None, regex="(unclosed"),
     "listeners[0].virtual_hosts[0].routes[0].match.regex: invalid regex"),
    (lambda d: d["clusters"].append(dict(d["clusters"][0])),
     "clusters[1].name: duplicate cluster name 'web'"),
    (lambda d: d["listeners"][0]["virtual_hosts"][0].update(domains=["a*b"]),
     "listeners[0].virtual_hosts[0].domains[0]: a wildcard is"),
    (lambda d: d["clusters"][0].update(connect_timeout="5 parsecs"),
     "clusters[0].connect_timeout: expected str matching regex"),
    (lambda d: d["listeners"][0]["virtual_hosts"][0]["routes"][0]["match"].update(
        headers=[{"name": "x"}]),
     "listeners[0].virtual_hosts[0].routes[0].match.headers[0]: exactly one of"),
    (lambda d: d["clusters"][0].update(minimum_ring_size=4096, maximum_ring_size=2048),
     "clusters[0].maximum_ring_size: must be at least minimum_ring_size (4096), got 2048"),
])
def test_config_load_cross_field_rules(mutate, expected: str) -> None:
    doc = raw()
    mutate(doc)
    errs = errors_of(doc)
    assert any(e.startswith(expected) for e in errs), errs


def test_config_load_json_file_and_yaml_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw()))
    assert load_file(p).clusters[0].name == "web"
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners: [\n  {name: a\n")
    with pytest.raises(ConfigError) as info:
        load_file(bad)
    assert "invalid YAML/JSON" in info.value.errors[0]
    with pytest.raises(ConfigError):
        load_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("1s", 1.0), ("1.5m", 90.0),
                                           ("2h", 7200.0), (3, 3.0), (0.5, 0.5)])
def test_config_load_durations(text, seconds: float) -> None:
    assert parse_duration(text) == seconds


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshproxy", *args], capture_output=True,
                          text=True, timeout=30)


def test_config_load_validate_cli_prints_paths_and_exits_2(tmp_path: Path) -> None:
    doc = raw()
    doc["listeners"][0]["virtual_hosts"][0]["routes"][0]["match"]["prefix"] = 5
    p = tmp_path / "bad.yaml"
    p.write_text(json.dumps(doc))
    r = _run_cli("validate", "--config", str(p))
    assert r.returncode == 2
    assert "listeners[0].virtual_hosts[0].routes[0].match.prefix: expected str, got int" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(ISSUE_EXAMPLE)
    r = _run_cli("validate", "--config", str(good))
    assert r.returncode == 0, r.stderr


def test_config_load_run_refuses_invalid_config_before_binding(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = raw()
    doc["listeners"][0]["port"] = port
    doc["clusters"][0]["endpoints"][0]["port"] = "eighty"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    proc = subprocess.Popen([sys.executable, "-m", "meshproxy", "run", "--config", str(p)],
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "clusters[0].endpoints[0].port: expected int, got str" in err
    assert "listener" not in err.split("invalid config")[0]  # nothing was bound first


def test_config_load_regex_checked_as_the_route_table_compiles_it() -> None:
    """A str-only escape (\\N{...}) compiles as a str pattern but not as the bytes the
    route table matches: refused with its path, never found by a worker compiling it."""
    doc = raw()
    doc["listeners"][0]["virtual_hosts"][0]["routes"][0]["match"] = {"regex": r"/\N{DIGIT ONE}"}
    errs = errors_of(doc)
    assert any(e.startswith("listeners[0].virtual_hosts[0].routes[0].match.regex: invalid regex")
               for e in errs), errs


_TLS = {"certificates": [{"certificate_chain": "c.pem", "private_key": "k.pem"}]}


@pytest.mark.parametrize("listener,expected", [
    ({"codec": "http1", "tls": dict(_TLS, alpn=["h2", "http/1.1"])},
     "listeners[0].tls.alpn: offers h2, but the codec is http1"),
    ({"codec": "http2", "tls": dict(_TLS, alpn=["http/1.1"])},
     "listeners[0].tls.alpn: offers http/1.1, but the codec is http2"),
    ({"tls": dict(_TLS, alpn=[])}, "listeners[0].tls.alpn: must not be empty"),
    ({"codec": "h3"}, "listeners[0].codec: invalid enum value"),
    ({"http2": {"initial_stream_window_size": 1000}},
     "listeners[0].http2.initial_stream_window_size: expected int >= 65535"),
])
def test_config_load_http2_options(listener, expected: str) -> None:
    doc = raw()
    doc["listeners"][0].update(listener)
    errs = errors_of(doc)
    assert any(e.startswith(expected) for e in errs), errs


def test_config_load_alpn_follows_the_codec() -> None:
    from meshproxy.config.compile import CODEC_ALPN, listener_tls
    from meshproxy.config.schema import ListenerTLS, TLSCertificate

    t = ListenerTLS([TLSCertificate("c.pem", "k.pem")])
    material = {"c.pem": b"c", "k.pem": b"k"}
    assert CODEC_ALPN["auto"] == (b"h2", b"http/1.1")
    for codec, alpn in CODEC_ALPN.items():
        spec = listener_tls(t, material, codec)
        assert spec is not None and spec.alpn == alpn


@pytest.mark.parametrize("cluster, expected", [
    ({"protocol": "h2"}, "clusters[0].protocol: invalid enum value"),
    ({"http2": {"initial_stream_window_size": 10}},
     "clusters[0].http2.initial_stream_window_size: expected int >= 65535"),
    ({"http2": {"max_concurrent_streams": 0}},
     "clusters[0].http2.max_concurrent_streams: expected int >= 1"),
])
def test_config_load_upstream_http2_options(cluster, expected: str) -> None:
    doc = raw()
    doc["clusters"][0].update(cluster)
    errs = errors_of(doc)
    assert any(e.startswith(expected) for e in errs), errs


def test_config_load_upstream_protocol_compiles() -> None:
    """protocol http1 by default (the first wave's behaviour); http2 and downstream with
    Envoy's defaults for the stream limit and this proxy's windows."""
    doc = raw()
    spec = compile_config(decode(doc)).clusters["web"]
    assert spec.protocol == "http1"
    doc["clusters"][0].update({"protocol": "downstream",
                               "http2": {"initial_stream_window_size": 1 << 20}})
    spec = compile_config(decode(doc)).clusters["web"]
    assert spec.protocol == "downstream"
    assert spec.http2.initial_stream_window_size == 1 << 20
    assert spec.http2.max_concurrent_streams == 2_147_483_647
    assert spec.http2.initial_connection_window_size == 16 << 20
