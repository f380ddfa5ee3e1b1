from meshproxy.proxy.fast_path import Flight

class StreamFlight(Flight):
    def begin(self) -> None: ...
