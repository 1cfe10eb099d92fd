"""A tiny name -> object registry (timm style): an unknown name lists the valid ones."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be a name or a callable, got {type(name).__name__}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(map(repr, self._entries))}.{hint}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def close_names(name: str, valid: list[str]) -> str:
    """' Did you mean ...?' hint for an unknown name, or an empty string."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def describe(obj: Callable | str) -> str:
    if isinstance(obj, str):
        return obj
    name = getattr(obj, "name", None)  # a metric object (``metrics.SummedMetric``) names itself
    return name if isinstance(name, str) and name else getattr(obj, "__name__", type(obj).__name__)
