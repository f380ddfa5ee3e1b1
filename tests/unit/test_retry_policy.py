"""The sans-IO retry policy, deadlines and the compiled retry budget."""

from __future__ import annotations

import pytest

from meshproxy._core.circuit_state import RetryBudget
from meshproxy.config.snapshot import RetrySpec, conditions
from meshproxy.protocol.errors import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET
from meshproxy.proxy.retry_policy import (
    backoff,
    format_grpc_timeout,
    parse_deadline_ms,
    parse_grpc_timeout,
    retriable_failure,
    retriable_status,
)


def spec(retry_on: str, statuses: tuple[int, ...] = ()) -> RetrySpec:
    return RetrySpec(conditions(retry_on), 2, 0.0, frozenset(statuses), 0.025, 0.25, False,
                     65536)


@pytest.mark.parametrize("retry_on, status, expected", [
    ("5xx", 500, True), ("5xx", 503, True), ("5xx", 404, False),
    ("gateway-error", 502, True), ("gateway-error", 504, True), ("gateway-error", 500, False),
    ("retriable-4xx", 409, True), ("retriable-4xx", 429, False),
    ("reset", 503, False), ("connect-failure", 503, False),
])
def test_retry_policy_statuses(retry_on: str, status: int, expected: bool) -> None:
    assert retriable_status(spec(retry_on), status) is expected


def test_retry_policy_retriable_status_codes() -> None:
    s = spec("retriable-status-codes", (429, 418))
    assert retriable_status(s, 429) and retriable_status(s, 418)
    assert not retriable_status(s, 503)


@pytest.mark.parametrize("retry_on, failure, expected", [
    ("5xx", CONNECT_FAILURE, True), ("5xx", RESET, True), ("5xx", PER_TRY_TIMEOUT, True),
    ("gateway-error", RESET, True), ("reset", RESET, True), ("reset", PER_TRY_TIMEOUT, True),
    ("reset", CONNECT_FAILURE, True), ("connect-failure", CONNECT_FAILURE, True),
    ("connect-failure", RESET, False), ("retriable-4xx", RESET, False),
    ("refused-stream", RESET, False),
])
def test_retry_policy_failures(retry_on: str, failure: str, expected: bool) -> None:
    assert retriable_failure(spec(retry_on), failure) is expected


def test_retry_policy_backoff_full_jitter_capped() -> None:
    s = spec("5xx")
    assert backoff(s, 1, 0.0) == 0.0
    assert backoff(s, 1, 1.0) == pytest.approx(0.025)
    assert backoff(s, 2, 1.0) == pytest.approx(0.05)
    assert backoff(s, 3, 0.5) == pytest.approx(0.05)
    assert backoff(s, 10, 1.0) == pytest.approx(0.25)  # capped at max_interval


@pytest.mark.parametrize("value, seconds", [
    (b"100m", 0.1), (b"2S", 2.0), (b"1M", 60.0), (b"1H", 3600.0), (b"5000u", 0.005),
    (b"7n", 7e-9), (b"12345678m", 12345.678),
])
def test_retry_policy_grpc_timeout(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"100", b"100x", b"123456789m", b"-1m", b"1.5S"])
def test_retry_policy_grpc_timeout_invalid(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


def test_retry_policy_deadline_header_and_formats() -> None:
    assert parse_deadline_ms(b"250") == 0.25
    assert parse_deadline_ms(b"-5") is None and parse_deadline_ms(b"1e3") is None
    assert format_grpc_timeout(0.25) == b"250m"
    assert format_grpc_timeout(200000.0) == b"200000S"
    # Never more than 8 digits (gRPC's TimeoutValue), whatever the client allowed.
    assert format_grpc_timeout(99999999 * 3600.0) == b"99999999H"
    assert format_grpc_timeout(3e9) == b"50000000M"
    for seconds in (1e5, 1e8, 6e9, 3.6e11, 1e20):
        value = format_grpc_timeout(seconds)
        assert len(value) <= 9 and value[:-1].isdigit()
    assert parse_grpc_timeout(format_grpc_timeout(1.5)) == pytest.approx(1.5)


def test_circuit_state_concurrency_budget() -> None:
    b = RetryBudget(20, 3)
    assert b.allow(0, 100, 19) and not b.allow(0, 100, 20)
    assert b.allow(0, 0, 2) and not b.allow(0, 0, 3)  # min_retry_concurrency


def test_circuit_state_windowed_budget_slides() -> None:
    b = RetryBudget(50, 0, 10.0)
    for t in range(10):
        b.record_request(float(t))
    admitted = 0
    while b.allow(9.5, 0, 0):
        b.record_retry(9.5)
        admitted += 1
    assert admitted == 5  # 50% of 10 requests in the window
    # 5 s later the first half of the window (5 requests) has slid out; the retries stay
    assert not b.allow(14.5, 0, 0)
    # once the retries slid out too, the remaining requests allow more
    for t in range(20, 30):
        b.record_request(float(t))
    assert b.allow(29.9, 0, 0)
