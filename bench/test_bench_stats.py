"""What stats cost per proxied request: the exact stat operations the data path performs
for one successful proxied request (downstream and upstream), on a real slab."""

from __future__ import annotations

import pytest

from meshproxy.stats.sink import Sink


@pytest.fixture(scope="module")
def scopes():
    sink = Sink.private()
    return (sink.http("ingress"), sink.worker(), sink.cluster("web"),
            sink.endpoint("web", "127.0.0.1:8080"), sink.listener("ingress"))


def one_request(hs, ws, cs, es) -> None:
    blk = hs.block
    # DownstreamConnection._begin
    blk.inc(hs.downstream_rq_total)
    blk.add(hs.downstream_rq_active, 1)
    blk.inc(ws.downstream_rq_total)
    # forward(): upstream request accounting
    blk.inc(cs.upstream_rq_total)
    blk.add(cs.upstream_rq_active, 1)
    blk.inc(es.rq_total)
    blk.add(es.rq_active, 1)
    blk.add(cs.upstream_rq_active, -1)
    blk.add(es.rq_active, -1)
    blk.inc(cs.upstream_rq_1xx + 200 // 100 - 1)
    blk.observe(cs.upstream_rq_time, 0.42)
    # DownstreamConnection._finish
    blk.add(hs.downstream_rq_active, -1)
    blk.inc(hs.downstream_rq_1xx + 200 // 100 - 1)
    blk.observe(hs.downstream_rq_time, 0.45)


@pytest.mark.benchmark(group="stats per proxied request")
def test_bench_stats_per_request(benchmark, scopes) -> None:
    hs, ws, cs, es, _ = scopes
    benchmark(one_request, hs, ws, cs, es)
    assert hs.block.get(hs.downstream_rq_total) > 0
