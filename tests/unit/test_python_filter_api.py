"""The Python filter API (filters.python): Headers over a message's own fields, the fields
a filter may not touch, and the loader's errors."""

from __future__ import annotations

import pytest

from meshproxy.filters.python import FilterLoadError, Headers, load


def test_python_filter_headers_edit_the_message_fields() -> None:
    fields = [(b"accept", b"*/*"), (b"x-a", b"1"), (b"x-a", b"2")]
    h = Headers(fields)
    assert h.get("X-A") == "1" and h.get_all("x-a") == ["1", "2"] and "accept" in h
    h.set("x-a", " 3 ")
    assert fields == [(b"accept", b"*/*"), (b"x-a", b"3")]
    h.add("X-New", "v")
    h.remove("accept")
    assert fields == [(b"x-a", b"3"), (b"x-new", b"v")] and h.changed
    assert list(h) == [("x-a", "3"), ("x-new", "v")]


@pytest.mark.parametrize("name", ["content-length", "Transfer-Encoding", "host", "connection",
                                  "upgrade", "te", "keep-alive"])
def test_python_filter_cannot_touch_framing_or_host(name) -> None:
    h = Headers([])
    for op in (lambda: h.set(name, "x"), lambda: h.add(name, "x"), lambda: h.remove(name)):
        with pytest.raises(ValueError):
            op()


def test_python_filter_values_and_names_are_checked() -> None:
    h = Headers([])
    with pytest.raises(ValueError):
        h.set("x-a", "a\r\nx-smuggled: 1")
    with pytest.raises(ValueError):
        h.set("bad name", "v")
    with pytest.raises(ValueError):
        h.set("x:y", "v")


@pytest.mark.parametrize("target,message", [
    ("no_such_module_xyz:F", "cannot import"),
    ("tests.pyfilters:Nope", "cannot import"),
    ("tests.pyfilters:json", "is not a class"),
    ("tests.pyfilters:Recorder", "failed: KeyError"),
])
def test_python_filter_load_errors(target, message) -> None:
    with pytest.raises(FilterLoadError) as err:
        load(target, {}, 1.0, "")
    assert message in str(err.value)


def test_python_filter_needs_a_phase() -> None:
    class Empty:
        def __init__(self, config: dict) -> None:
            pass
    import tests.pyfilters as mod
    mod.Empty = Empty  # type: ignore[attr-defined]
    with pytest.raises(FilterLoadError, match="defines none of"):
        load("tests.pyfilters:Empty", {}, 1.0, "")
    loaded = load("tests.pyfilters:Headers", {"tag": "t"}, 0.5, "")
    assert loaded.name == "tests.pyfilters:Headers" and loaded.timeout == 0.5
    assert set(loaded.phases) == {"on_request_headers", "on_response_headers"}
