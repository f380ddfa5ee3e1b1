"""Send raw bytes to a proxy and print what comes back: for trying corpus cases by hand.

    python tools/wire.py 127.0.0.1:10000 tests/corpus/400_obs_fold.http
    printf 'GET / HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n' | python tools/wire.py 127.0.0.1:10000 -
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    host, _, port = argv[0].rpartition(":")
    data = sys.stdin.buffer.read() if argv[1] == "-" else Path(argv[1]).read_bytes()
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5) as s:
        s.sendall(data)
        try:
            while chunk := s.recv(65536):
                sys.stdout.buffer.write(chunk)
        except TimeoutError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
