"""Every error of the orchestration package, in one place. Each is a DiffmicError: the command lines print it as one
line naming the value and what was expected (diffmic/cli.py:one_line_errors), never a traceback."""
from __future__ import annotations

from diffmic.errors import DiffmicError
from diffmic.secrets import redact


class StorageError(DiffmicError, RuntimeError):
    """Storage (local or S3) unreachable, refused or inconsistent: one line naming the URI/endpoint and what was
    expected; never contains a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(redact(str(message)).split()))


class RecordError(StorageError):
    """A record that is missing, or written by a newer format; one line naming where and what was expected."""


class SearchError(DiffmicError, ValueError):
    """A search configuration that cannot run; one line naming the key and what is expected."""


class ParetoError(SearchError):
    """A `search.pareto` grid that cannot be measured."""
