"""Startup errors out of trio: since trio 0.25 what a nursery raises arrives wrapped in an
ExceptionGroup, while the CLI wants to print a bind failure as one clear line."""

from __future__ import annotations


def leaves(exc: BaseException, kind: type[BaseException]) -> list[BaseException] | None:
    """The exceptions of type `kind` that `exc` is made of (itself, or every leaf of a
    group), or None when it holds anything else (which the caller must re-raise)."""
    if isinstance(exc, kind):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            got = leaves(sub, kind)
            if got is None:
                return None
            out += got
        return out
    return None
