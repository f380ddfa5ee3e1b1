"""Entry point of a worker process: `python -m meshproxy.process.worker_process ...`.

Started by the supervisor with two inherited descriptors: the read end of its control pipe
and the stats segment (a memfd). It reads snapshots and drain orders from the pipe (never
writes back: readiness and counters travel through its stats slab), serves with a Worker,
and exits 0 after a drain, or when the supervisor goes away (the pipe closes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import signal
import sys
from functools import partial

import trio

from meshproxy.config.compile import compile_config
from meshproxy.process.bucket_memory import BucketMemory
from meshproxy.process.demand_memory import DemandMemory
from meshproxy.process.errors import leaves
from meshproxy.process.messages import DrainMsg, FrameReader, SnapshotMsg
from meshproxy.process.worker import Worker
from meshproxy.stats.diff_samples import DiffSamples
from meshproxy.stats.shared_memory import Capacity, Layout, Segment, Slots
from meshproxy.stats.sink import Sink

log = logging.getLogger("meshproxy.worker")


def _slots(msg: SnapshotMsg) -> Slots:
    return Slots(dict(msg.listener_slots), dict(msg.cluster_slots), dict(msg.endpoint_slots),
                 dict(msg.mirror_slots))


async def _main(args: argparse.Namespace, segment: Segment) -> None:
    stream = trio.lowlevel.FdStream(args.control_fd)
    reader = FrameReader()
    pending: list = []

    async def next_msg() -> SnapshotMsg | DrainMsg | None:
        while not pending:
            data = await stream.receive_some(65536)
            if not data:
                return None
            pending.extend(reader.feed(data))
        return pending.pop(0)

    first = await next_msg()
    if not isinstance(first, SnapshotMsg):
        raise SystemExit("worker: expected a snapshot first")
    sink = Sink(segment, args.index, _slots(first), enabled=not args.no_stats)
    buckets = BucketMemory(args.buckets_fd)
    worker = Worker(compile_config(first.config, first.version, first.access_log_override,
                                   first.workers, first.material,
                                   buckets.memory(first.bucket_slots)),
                    sink, args.max_connections, fast_path=not args.no_fast_path)
    if args.demand_fd is not None:
        demand = DemandMemory(first.workers, args.demand_fd)
        worker.state.demand = partial(demand.note, args.index)
    if args.samples_fd is not None:
        samples = DiffSamples(first.workers, args.samples_fd)
        worker.state.diff_sample = partial(samples.record, args.index)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            log.debug("worker %d serving config version %d", args.index, first.version)

            async def on_sigterm() -> None:
                async for _ in signals:
                    await worker.drain(args.drain_timeout)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_sigterm)
            while True:
                msg = await next_msg()
                if msg is None:  # the supervisor is gone: do not outlive it
                    await worker.drain(args.drain_timeout)
                    break
                if isinstance(msg, DrainMsg):
                    await worker.drain(msg.timeout)
                    break
                sink.slots = _slots(msg)
                worker.apply(compile_config(msg.config, msg.version, msg.access_log_override,
                                            msg.workers, msg.material,
                                            buckets.memory(msg.bucket_slots)))
                log.debug("worker %d adopted config version %d", args.index, msg.version)
            nursery.cancel_scope.cancel()


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: SIGTERM (a drain) when the supervisor dies, even by SIGKILL,
    so a worker can never outlive it holding the ports; the closed control pipe says the
    same, this also covers a worker blocked elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="meshproxy-worker")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--stats-fd", type=int, required=True)
    ap.add_argument("--buckets-fd", type=int, required=True)
    ap.add_argument("--demand-fd", type=int, default=None)
    ap.add_argument("--samples-fd", type=int, default=None)
    ap.add_argument("--slabs", type=int, required=True)
    ap.add_argument("--capacity", type=int, nargs=3, required=True)
    ap.add_argument("--cpu", type=int, default=None)
    ap.add_argument("--max-connections", type=int, default=0)
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--no-stats", action="store_true")
    ap.add_argument("--no-fast-path", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format=f"%(asctime)s %(levelname)s worker[{args.index}] %(name)s: "
                               "%(message)s")
    # Ctrl-C in a terminal signals the whole process group; the supervisor decides how
    # workers stop (a drain), so a worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    cap = Capacity(*args.capacity)
    segment = Segment(Layout(cap), args.slabs, fd=args.stats_fd)
    # What the worker has made so far (its modules, their tables) lives as long as it does:
    # out of the collector's generations, the full collections that requests trigger do
    # not walk it again each time.
    gc.freeze()
    # The youngest generation is collected after 10,000 tracked allocations, not 700: a
    # request makes and frees dozens of tracked objects (by reference count, almost all),
    # so at 700 the collector ran every few requests to find next to nothing (2-4% of a
    # worker under load). Cyclic garbage waits for at most 10,000 allocations.
    gc.set_threshold(10_000, 10, 10)
    try:
        trio.run(_main, args, segment)
    except BaseException as exc:
        errors = leaves(exc, OSError)
        if errors is None:
            raise
        for err in errors:
            log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
