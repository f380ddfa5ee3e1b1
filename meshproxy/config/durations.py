"""Durations in config: "250ms", "1s", "1.5m", "1h", or a number of seconds."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds as a float. Raises ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"invalid duration {value!r} (use e.g. 250ms, 1s, 2m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]
