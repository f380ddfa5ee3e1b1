"""What the security filters cost per request: a shared token bucket take (one CAS), a
keyed take with its response headers, and an authorization check of three policies."""

from __future__ import annotations

import msgspec

from meshproxy._core.lb_select import hash_bytes
from meshproxy._core.token_bucket import TokenBuckets
from meshproxy.config import schema
from meshproxy.filters.authz import Authorizer, Request
from meshproxy.filters.local_ratelimit import LocalRateLimiter, RateLimitSpec, private_memory

# A rate no benchmark loop can exhaust: the figures are for the allowed path.
HUGE = 1e12


def test_bench_token_bucket_take(benchmark) -> None:
    b = TokenBuckets(bytearray(64), 0, 1, 1_000_000_000, HUGE)
    assert benchmark(b.take)


def test_bench_rate_limiter_keyed_with_headers(benchmark) -> None:
    spec = RateLimitSpec("bench#4096", 1_000_000_000, HUGE, 1.0, "remote_address", b"", 4096,
                         True)
    limiter = LocalRateLimiter(spec, private_memory)

    def one() -> bool:
        ok, _headers = limiter.take(hash_bytes(b"10.1.2.3"))
        return ok

    assert benchmark(one)


def test_bench_authz_three_policies(benchmark) -> None:
    policies = [msgspec.convert(p, schema.AuthorizationPolicy) for p in (
        {"name": "reads", "action": "ALLOW", "rules": [{
            "from": [{"principals": ["cluster.local/ns/default/*"]}],
            "to": [{"methods": ["GET"], "paths": ["/api/*"]}]}]},
        {"name": "ops", "action": "ALLOW", "rules": [{
            "from": [{"namespaces": ["ops"]}]}]},
        {"name": "no-debug", "action": "DENY", "rules": [{"to": [{"paths": ["/debug*"]}]}]},
    )]
    authz = Authorizer(policies)
    req = Request("GET", "/api/items", "shop.example", 8443, "10.1.2.3",
                  "cluster.local/ns/default/sa/web", "default", {}.get)
    assert benchmark(lambda: authz.check(req).allowed)
