"""Access log lines, JSON and text, to a file and to stdout; off means no line."""

from __future__ import annotations

import json
import re
import socket

from tests.helpers import config, raw_exchange, read_response, wait_for


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_json_fields(origin, proxy_factory, tmp_path) -> None:
    log = tmp_path / "a.log"
    p = proxy_factory(config(origin.port, access_log={"path": str(log), "format": "json",
                                                      "flush_interval": "50ms"}))
    raw_exchange(p.port, b"POST /x?y=1 HTTP/1.1\r\nHost: h.example\r\nContent-Length: 3\r\n"
                         b"User-Agent: ua/1\r\nX-Request-Id: rid-7\r\nConnection: close\r\n\r\nabc")
    entry = json.loads(wait_for(lambda: _lines(log))[0])
    assert entry["method"] == "POST" and entry["path"] == "/x?y=1"
    assert entry["protocol"] == "HTTP/1.1" and entry["response_code"] == 200
    assert entry["response_flags"] == "-" and entry["bytes_received"] == 3
    assert entry["bytes_sent"] > 0 and entry["duration"] >= 0
    assert entry["upstream_host"] == f"127.0.0.1:{origin.port}"
    assert entry["x_request_id"] == "rid-7" and entry["authority"] == "h.example"
    assert entry["user_agent"] == "ua/1"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", entry["start_time"])


def test_access_log_text_format_generated_request_id(origin, proxy_factory, tmp_path) -> None:
    log = tmp_path / "t.log"
    p = proxy_factory(config(origin.port, access_log={"path": str(log), "format": "text",
                                                      "flush_interval": "50ms"}))
    raw_exchange(p.port, b"GET /t HTTP/1.0\r\n\r\n")
    line = wait_for(lambda: _lines(log))[0]
    m = re.match(r'\[(\S+)\] "GET /t HTTP/1.0" 200 - 0 (\d+) (\d+) "-" "-" "([0-9a-f-]{36})" '
                 r'"-" "127.0.0.1:(\d+)" "-" "-"$', line)
    assert m, line
    # the generated id in the log is the one the origin received
    assert origin.requests[-1].header(b"x-request-id").decode() == m.group(4)


def test_access_log_stdout_flag_and_off(origin, proxy_factory) -> None:
    p = proxy_factory(config(origin.port), "--access-log", "stdout")
    raw_exchange(p.port, b"GET /so HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    line = p.proc.stdout.readline().decode()
    assert '"GET /so HTTP/1.1" 200' in line
    q = proxy_factory(config(origin.port, access_log={"path": "stdout"}), "--access-log", "off")
    raw_exchange(q.port, b"GET /off HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    q.stop()
    assert q.proc.stdout.read() == b""


def test_access_log_parse_error_logged_dpe(origin, proxy_factory, tmp_path) -> None:
    log = tmp_path / "d.log"
    p = proxy_factory(config(origin.port, access_log={"path": str(log), "format": "json",
                                                      "flush_interval": "50ms"}))
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    entry = json.loads(wait_for(lambda: _lines(log))[0])
    assert entry["response_code"] == 400 and entry["response_flags"] == "DPE"


def test_access_log_text_escapes_quotes_and_obs_text(origin, proxy_factory, tmp_path) -> None:
    """A field with a quote is escaped and one with bytes past ASCII is written as UTF-8,
    while the fields beside it in the same line stay as they came."""
    log = tmp_path / "e.log"
    p = proxy_factory(config(origin.port, access_log={"path": str(log), "format": "text",
                                                      "flush_interval": "50ms"}))
    raw_exchange(p.port, b'GET /q HTTP/1.1\r\nHost: h\r\nUser-Agent: say "hi"\r\n'
                         b"X-Request-Id: caf\xe9\r\nConnection: close\r\n\r\n")
    raw_exchange(p.port, b"GET /plain HTTP/1.1\r\nHost: h\r\nUser-Agent: ua\r\n"
                         b"X-Request-Id: r1\r\nConnection: close\r\n\r\n")
    lines = wait_for(lambda: len(_lines(log)) == 2 and _lines(log))
    assert ' "GET /q HTTP/1.1" 200 ' in lines[0]
    assert '"-" "say \\"hi\\"" "café" "h" ' in lines[0], lines[0]
    assert '"-" "ua" "r1" "h" ' in lines[1], lines[1]


def test_access_log_batch_past_64k_is_written_before_the_interval(
        origin, proxy_factory, tmp_path) -> None:
    """Envoy's 64 KiB buffer bound: a busy worker writes its lines as the batch fills, not a
    second's worth at once; an idle one still writes only on the interval."""
    log = tmp_path / "b.log"
    p = proxy_factory(config(origin.port, access_log={"path": str(log), "format": "text",
                                                      "flush_interval": "1h"}))
    path = b"/" + b"p" * 2000
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(40):  # 40 lines of some 2.2 KB: past 64 KiB
            s.sendall(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
            status, _, _ = read_response(s)
            assert status == 200
    lines = wait_for(lambda: _lines(log))
    assert 25 <= len(lines) <= 40 and all(path.decode() in line for line in lines)
