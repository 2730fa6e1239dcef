"""The one exception type for bad data input, and helpers that keep its message to one line."""
from __future__ import annotations

from collections.abc import Iterable

from diffmic.errors import DiffmicError


class DataError(DiffmicError, ValueError):
    """Bad input. str(e) is ONE line naming the bad value and what was expected."""

    def __init__(self, message: object) -> None:
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))


def preview(items: Iterable[object], limit: int = 8) -> str:
    """'a, b, c' (at most `limit` items, then '... (N more)')."""
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head}, ... ({len(items) - limit} more)"
