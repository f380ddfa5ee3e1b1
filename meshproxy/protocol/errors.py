"""Errors that say who failed and what to answer (DESIGN.md section 5.4).

Every failure on the data path becomes a ProxyError carrying the status to answer, Envoy's
response flag for the access log, the source (downstream, upstream, internal), whether a
retry may help, and a detail line for the log and the local reply body. Only the retry
policy decides retries; this only says whether one would be safe.
"""

from __future__ import annotations

from typing import Literal

Source = Literal["downstream", "upstream", "internal"]


class ProxyError(Exception):
    __slots__ = ("status", "flag", "source", "retriable", "detail", "stat", "failure")

    def __init__(self, status: int, flag: str, source: Source, detail: str,
                 retriable: bool = False, stat: str = "", failure: str = "") -> None:
        super().__init__(f"{flag} {status}: {detail}")
        self.status = status
        self.flag = flag
        self.source = source
        self.retriable = retriable
        self.detail = detail
        # The cluster stat (stats.names.CLUSTER) that counts this failure, if any.
        self.stat = stat
        # For an attempt that got no response: CONNECT_FAILURE, RESET, REFUSED or
        # PER_TRY_TIMEOUT below; the retry policy decides what to do.
        self.failure = failure


# What went wrong with an attempt that produced no response (ProxyError.failure).
CONNECT_FAILURE = "connect-failure"
RESET = "reset"
REFUSED = "refused-stream"  # HTTP/2: the origin did not process the stream (RFC 9113 8.7)
PER_TRY_TIMEOUT = "per-try-timeout"


# Envoy's response flags (access log %RESPONSE_FLAGS%) used by the HTTP/1.1 data path.
NO_ROUTE = "NR"                    # no route for the request: 404
NO_CLUSTER = "NC"                  # the route names a cluster that does not exist: 503
NO_HEALTHY_UPSTREAM = "UH"         # the cluster has no endpoint to pick: 503
UPSTREAM_CONNECT_FAILURE = "UF"    # connect refused or timed out: 503
UPSTREAM_CONNECTION_TERMINATION = "UC"  # upstream closed or reset before/while answering: 503
UPSTREAM_REQUEST_TIMEOUT = "UT"    # route timeout: 504
UPSTREAM_OVERFLOW = "UO"           # a circuit breaker refused the request: 503
UPSTREAM_PROTOCOL_ERROR = "UPE"    # the upstream's response broke HTTP/1.1 framing: 502
DOWNSTREAM_PROTOCOL_ERROR = "DPE"  # the client's request broke HTTP/1.1: 4xx
DOWNSTREAM_CONNECTION_TERMINATION = "DC"  # the client went away mid-exchange
RATE_LIMITED = "RL"                # a local rate limit refused the request: 429
STREAM_IDLE_TIMEOUT = "SI"         # the client stalled: request headers or body timeout: 408
DELAY_INJECTED = "DI"              # a fault filter delayed the request
FAULT_INJECTED = "FI"              # a fault filter aborted the request
FILTER_ERROR = "FE"                # a Python filter raised or outlasted its timeout: 500
