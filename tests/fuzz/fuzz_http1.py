"""Coverage-guided fuzzing of the compiled HTTP/1.1 parser (atheris, i.e. libFuzzer).

    python -m tests.fuzz.fuzz_http1 -runs=10000000          # or -max_total_time=SECONDS
    MESHPROXY_FUZZ_TARGET=chunked python -m tests.fuzz.fuzz_http1 -runs=10000000 DIR

The parser is built a second time, instrumented for libFuzzer, into build/fuzz/
(tests/fuzz/instrument.py); the regular build is not touched. The seeds are tests/corpus/ (each case behind the byte that selects its target).

One input exercises one target, chosen by its first byte:
  0  request head parser   1  response head parser   2  chunked decoder
and checks the invariants the proxy relies on, beyond "does not crash":
- a refusal carries one of the statuses the proxy may answer;
- an accepted head ends inside the input, its framing is one of (none, a length within
  MAX_BODY_LENGTH, chunked), never both, and its target holds no fragment;
- the head the proxy would forward (the peer's framing lines dropped, its own written) parses
  back to the same fields and the same framing: what is forwarded is what was decided;
- parsing is incremental: the head alone gives the same result as the head plus what follows;
- the chunked decoder gives the same payload, trailers, end and error fed in one piece or in
  two, and re-encoding its payload decodes back to the same payload.
Any other exception, or a failed check, is a crash: libFuzzer writes the input to
crash-<sha1> in the working directory. Every one found goes to tests/corpus/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

from tests.fuzz.instrument import BUILD, ROOT, instrumented

CORPUS = ROOT / "tests" / "corpus"
MAX_BODY_LENGTH = 1 << 62
REQUEST_STATUSES = {400, 414, 431, 501, 505}
RESPONSE_STATUSES = {502}
FRAMING = frozenset({b"content-length", b"transfer-encoding"})


def make_seeds() -> Path:
    """tests/corpus/ as seeds: each case behind its target byte; chunked bodies also alone."""
    seeds = BUILD / "seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    for path in sorted(CORPUS.glob("*.http")):
        data = path.read_bytes()
        target = b"\x01" if "_response_" in path.name else b"\x00"
        (seeds / path.stem).write_bytes(target + data)
        cut = data.find(b"\r\n\r\n")
        if b"chunked" in data.lower() and cut >= 0:
            (seeds / (path.stem + ".body")).write_bytes(b"\x02\x07" + data[cut + 4:])
    return seeds


class Targets:
    def __init__(self, mod) -> None:
        self.mod = mod
        self.parser = mod.HeadParser()
        # The forwarded head is parsed back without the limits of a received one: the
        # proxy adds fields (Host for an HTTP/1.0 request without one), so a request at the
        # header-count or size limit is forwarded past it. That is the origin's limit to
        # enforce (Envoy's too: it adds x-forwarded-for, x-request-id, ...); what is checked
        # here is that the framing forwarded is the framing decided.
        self.reparser = mod.HeadParser(1 << 20, 1 << 24, 1 << 16)
        # MESHPROXY_FUZZ_TARGET=request|response|chunked fixes the target (the first byte
        # of each input is then ignored), so each can be given its own number of runs.
        name = os.environ.get("MESHPROXY_FUZZ_TARGET")
        self.kind = None if not name else ("request", "response", "chunked").index(name)

    def one(self, data: bytes) -> None:
        if not data:
            return
        kind, body = (data[0] if self.kind is None else self.kind) % 3, data[1:]
        if kind == 0:
            self.request(body)
        elif kind == 1:
            self.response(body)
        elif body:
            self.chunked(body[1:], body[0])

    def _head(self, data: bytes, request: bool):
        parse = self.parser.parse_request if request else self.parser.parse_response
        try:
            return parse(data), None
        except self.mod.ParseError as exc:
            return None, exc

    def request(self, data: bytes) -> None:
        head, err = self._head(data, True)
        if err is not None:
            assert err.status in REQUEST_STATUSES, err.status
            return
        if head is None:
            return
        self._check_head(data, head, True)
        assert b"#" not in head.target
        # The head as the proxy forwards it: peer framing dropped, decided framing written.
        extra = []
        if head.chunked:
            extra.append((b"transfer-encoding", b"chunked"))
        elif head.content_length >= 0:
            extra.append((b"content-length", b"%d" % head.content_length))
        extra.append((b"host", head.host or b""))  # as the proxy: always one Host
        out = self.mod.serialize_head(head.method + b" " + head.target + b" HTTP/1.1",
                                      head.headers, FRAMING | {b"host"}, extra)
        again = self.reparser.parse_request(out)
        assert again is not None and again.end == len(out)
        assert (again.chunked, again.content_length) == (head.chunked, head.content_length)
        assert [h for h in again.headers if h[0] not in FRAMING] == \
            [h for h in head.headers if h[0] not in FRAMING and h[0] != b"host"] + [
                (b"host", head.host or b"")]

    def response(self, data: bytes) -> None:
        head, err = self._head(data, False)
        if err is not None:
            assert err.status in RESPONSE_STATUSES, err.status
            return
        if head is None:
            return
        self._check_head(data, head, False)
        assert 100 <= head.status <= 599

    def _check_head(self, data: bytes, head, request: bool) -> None:
        assert 0 < head.end <= len(data)
        assert -1 <= head.content_length <= MAX_BODY_LENGTH
        assert not (head.chunked and head.content_length != -1)
        alone, err = self._head(data[:head.end], request)
        assert err is None and alone is not None
        assert alone.end == head.end and alone.headers == head.headers
        assert (alone.chunked, alone.content_length) == (head.chunked, head.content_length)

    def _decode(self, pieces: list[bytes]) -> tuple:
        dec = self.mod.ChunkedDecoder()
        out, pos = [], 0
        try:
            for piece in pieces:
                parts, pos = dec.feed(piece)
                out += parts
                if dec.done:
                    break
        except self.mod.ParseError as exc:
            assert exc.status in (400, 431), exc.status
            return ("error", exc.reason)
        return (b"".join(out), dec.done, list(dec.trailers), pos if dec.done else None)

    def chunked(self, data: bytes, cut: int) -> None:
        whole = self._decode([data])
        cut = cut % (len(data) + 1)
        split = self._decode([data[:cut], data[cut:]])
        if whole[0] == "error":
            assert split[0] == "error", (whole, split)
            return
        payload, done, trailers, end = whole
        assert split[:3] == whole[:3], (whole, split)
        if done:
            # Where the message ends: in the second piece when the first ended before it.
            assert split[3] == (end - cut if end > cut else end) or end == cut, (whole, split)
            again = self._decode([self.mod.encode_chunk(payload)
                                  + self.mod.encode_last_chunk(trailers)])
            assert again[0] == payload and again[1] and again[2] == trailers


def main() -> None:
    mod = instrumented("http1_parser")
    targets = Targets(mod)
    # Corpus directories become absolute: the run happens in BUILD.
    args = [sys.argv[0]] + [a if a.startswith("-") else os.path.abspath(a)
                            for a in sys.argv[1:]]
    # tests/corpus/ always seeds the run; libFuzzer adds what it finds to the first
    # directory given, so the seeds go last.
    args.append(str(make_seeds()))
    os.chdir(BUILD)  # crash-* and the grown corpus stay out of the source tree
    atheris.Setup(args, targets.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
