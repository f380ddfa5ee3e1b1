"""Type stubs for meshproxy._core.h2_server (the server side of HTTP/2, compiled)."""

from collections.abc import Iterable
from typing import Any

from meshproxy._core.hpack import Decoder, Encoder

PREFACE: bytes

class RequestReceived:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    stream_ended: StreamEnded | None
    priority_updated: Any

class DataReceived:
    stream_id: int
    data: bytes
    flow_controlled_length: int
    stream_ended: StreamEnded | None

class TrailersReceived:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    stream_ended: StreamEnded | None
    priority_updated: Any

class StreamEnded:
    stream_id: int

class StreamReset:
    stream_id: int
    error_code: int
    remote_reset: bool

class WindowUpdated:
    stream_id: int
    delta: int

class PriorityUpdated:
    stream_id: int
    weight: int
    depends_on: int
    exclusive: bool

class PingReceived:
    ping_data: bytes

class RemoteSettingsChanged:
    changed_settings: dict[int, int]

class SettingsAcknowledged: ...

class ConnectionTerminated:
    error_code: int
    last_stream_id: int
    additional_data: bytes | None

class H2ServerConnection:
    highest_inbound_stream_id: int
    max_outbound_frame_size: int
    decoder: Decoder
    encoder: Encoder
    def __init__(self, max_concurrent_streams: int = 100, initial_window: int = 65535,
                 header_table_size: int = 4096, max_header_list_size: int = 65536,
                 enable_connect: bool = False) -> None: ...
    def data_to_send(self) -> bytes: ...
    def initiate_connection(self) -> None: ...
    def increment_flow_control_window(self, increment: int,
                                      stream_id: int | None = None) -> None: ...
    def close_connection(self, error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None: ...
    def local_flow_control_window(self, stream_id: int) -> int: ...
    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None: ...
    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...
    def reset_stream(self, stream_id: int, error_code: int = 0) -> None: ...
    def acknowledge_received_data(self, n: int, stream_id: int) -> None: ...
    def header_block_pending(self) -> bool: ...
    def receive_data(self, data: bytes) -> list[Any]: ...
