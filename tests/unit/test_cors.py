"""The CORS policy (filters.cors, built by config.compile) and its configuration's checks."""

from __future__ import annotations

import pytest

from meshproxy.config import schema
from meshproxy.config.compile import cors_policy
from meshproxy.config.load import ConfigError, decode
from tests.unit.test_fault import config_with


def policy(**kw):
    return cors_policy(schema.Cors(**kw))


def test_cors_origin_matches() -> None:
    p = policy(allow_origins=[schema.StringMatch(exact="https://a.example"),
                              schema.StringMatch(prefix="https://pre"),
                              schema.StringMatch(suffix=".b.example"),
                              schema.StringMatch(regex=r"https://\w+\.c\.example"),
                              schema.StringMatch(exact="HTTPS://D.EXAMPLE", ignore_case=True)])
    for ok in (b"https://a.example", b"https://prefix.io", b"http://x.b.example",
               b"https://q1.c.example", b"https://d.example", b"https://D.Example"):
        assert p.allowed(ok), ok
    for no in (b"https://a.example.evil", b"https://A.example", b"http://pre",
               b"https://q1.c.example.evil", b"null", b""):
        assert not p.allowed(no), no


def test_cors_fields() -> None:
    p = policy(allow_origins=[schema.StringMatch(exact="o")], allow_methods=["GET", "PUT"],
               allow_headers=["x-a"], expose_headers=["x-b", "x-c"], max_age="10m",
               allow_credentials=True)
    assert dict(p.preflight_answer(b"o")) == {
        b"access-control-allow-origin": b"o", b"access-control-allow-credentials": b"true",
        b"access-control-allow-methods": b"GET, PUT", b"access-control-allow-headers": b"x-a",
        b"access-control-max-age": b"600", b"vary": b"origin"}
    assert dict(p.response_extra(b"o")) == {
        b"access-control-allow-origin": b"o", b"access-control-allow-credentials": b"true",
        b"access-control-expose-headers": b"x-b, x-c", b"vary": b"origin"}
    bare = policy(allow_origins=[schema.StringMatch(exact="o")])
    assert dict(bare.response_extra(b"o")) == {b"access-control-allow-origin": b"o",
                                               b"vary": b"origin"}


@pytest.mark.parametrize("cors,message", [
    ({"allow_origins": []}, "cors.allow_origins"),
    ({"allow_origins": [{}]}, "allow_origins[0]: exactly one of exact, prefix, suffix, regex"),
    ({"allow_origins": [{"exact": "a", "prefix": "b"}]}, "allow_origins[0]: exactly one"),
    ({"allow_origins": [{"regex": "("}]}, "allow_origins[0].regex: invalid regex"),
    ({"allow_origins": [{"exact": "a"}], "max_age": "soon"}, "cors.max_age"),
    ({"allow_origins": [{"exact": "a"}], "allow_methods": ["G ET"]}, "cors.allow_methods"),
])
def test_cors_config_errors_name_the_field(cors, message) -> None:
    cfg = config_with({"abort": {"http_status": 503}})
    route = cfg["listeners"][0]["virtual_hosts"][0]["routes"][0]
    del route["fault"]
    route["cors"] = cors
    with pytest.raises(ConfigError) as err:
        decode(cfg, "test")
    assert message in str(err.value)
