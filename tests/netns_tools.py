"""Small TCP programs run inside the sidecar tests' namespaces (tests/netns.py):

  serve ADDR PORT TEXT [ADDR PORT TEXT ...]
      answer every connection with TEXT, then the original destination the kernel kept
      for it ("-" when it was not redirected), then close; prints "listening" once bound
  echo ADDR PORT [ADDR PORT ...]
      send back every byte received, then close once the client has half-closed
  http ADDR PORT TEXT [ADDR PORT TEXT ...]
      an HTTP/1.1 origin: 200 with "TEXT PATH xff=X-FORWARDED-FOR" to every request
  call HOST PORT [SEND]
      connect, send SEND (if any), half-close, print what comes back ("refused" when the
      connection is refused, "reset" when it is reset); it needs only the standard
      library, so that the system's python3 runs it as any user (the proxy's UID among
      them), where the project's interpreter may not be readable
"""

from __future__ import annotations

import socket
import sys
import threading


def _serve_one(lsock: socket.socket, text: str) -> None:
    from meshproxy.transport.original_dst import original_dst

    while True:
        conn, peer = lsock.accept()
        with conn:
            dst = original_dst(conn, peer)
            where = "-" if dst is None else f"{dst[0]} {dst[1]}"
            conn.sendall(f"{text} {where}\n".encode())


def serve(args: list[str]) -> None:
    threads = []
    for i in range(0, len(args), 3):
        addr, port, text = args[i], int(args[i + 1]), args[i + 2]
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((addr, port))
        lsock.listen(64)
        threads.append(threading.Thread(target=_serve_one, args=(lsock, text), daemon=True))
    for t in threads:
        t.start()
    print("listening", flush=True)
    threading.Event().wait()


def _listen(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(64)
    return lsock


def _echo_one(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)


def _echo(lsock: socket.socket) -> None:
    while True:
        conn, _peer = lsock.accept()
        threading.Thread(target=_echo_one, args=(conn,), daemon=True).start()


def echo(args: list[str]) -> None:
    for i in range(0, len(args), 2):
        threading.Thread(target=_echo, args=(_listen(args[i], int(args[i + 1])),),
                         daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


def http(args: list[str]) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def handler(text: str) -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = f"{text} {self.path} xff={self.headers.get('x-forwarded-for')}\n"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *_args: object) -> None:
                pass
        return Handler

    for i in range(0, len(args), 3):
        addr, port, text = args[i], int(args[i + 1]), args[i + 2]

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            daemon_threads = True

        server = Server((addr, port), handler(text))
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


def call(host: str, port: int, send: str = "") -> str:
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            if send:
                s.sendall(send.encode())
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"


if __name__ == "__main__":
    if sys.argv[1] in ("serve", "echo", "http"):
        {"serve": serve, "echo": echo, "http": http}[sys.argv[1]](sys.argv[2:])
    else:
        print(call(sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
