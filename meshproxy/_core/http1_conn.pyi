"""Type stubs for meshproxy._core.http1_conn (see the .pyx for the theory)."""

from meshproxy._core.http1_parser import MessageHead

FRAMING_NONE: int
FRAMING_LENGTH: int
FRAMING_CHUNKED: int
FRAMING_CLOSE: int
FRAMING_TUNNEL: int
IDLE: int
SEND_BODY: int
DONE: int
MUST_CLOSE: int
CLOSED: int
SWITCHED: int
ERROR: int
STATE_NAMES: tuple[str, ...]
EV_REQUEST: int
EV_INFORMATIONAL: int
EV_RESPONSE: int
EV_END: int
EV_CLOSED: int
EV_SWITCH: int

def request_framing(head: MessageHead) -> int: ...
def response_framing(request_method: bytes, resp: MessageHead) -> int: ...

class ResponsePlan:
    framing: int
    down_chunked: bool
    keep: bool
    extra: list[tuple[bytes, bytes]]
    def __init__(self, framing: int, down_chunked: bool, keep: bool,
                 extra: list[tuple[bytes, bytes]]) -> None: ...

def plan_response(req: MessageHead, resp: MessageHead, request_complete: bool,
                  may_keep: bool) -> ResponsePlan: ...
def relay_informational(req: MessageHead, status: int) -> bool: ...
def upstream_reusable(request_complete: bool, resp: MessageHead, framing: int) -> bool: ...

class ConnState:
    client: int
    server: int
    keep_alive: bool
    def __init__(self) -> None: ...
    def event(self, role: int, ev: int) -> int: ...
    def no_keep_alive(self) -> None: ...
    def next_cycle(self) -> bool: ...
