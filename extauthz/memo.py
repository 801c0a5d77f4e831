"""One bounded memo for the hot path's "seen this exact input before" lookups.

Per check the server answers the same few hosts, certificates and decisions over and over;
recomputing them costs more than a dict lookup. Every such memo is a `Memo`: owned by the
object that fills it (never a module global, so two apps or two tests never share one),
bounded, and with one eviction rule: when full, the oldest entry goes (FIFO). FIFO rather
than LRU keeps a hit a plain `dict.get` (no reordering under the GIL) and a flood of distinct
keys (an attacker varying the Host header) costs one eviction per new key, never a rebuild.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict bounded to `maxsize` entries (0: remembers nothing). Read with `get`."""

    __slots__ = ("maxsize",)

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        if maxsize < 0:
            raise ValueError("a memo size must not be negative")
        self.maxsize = maxsize

    def put(self, key: K, value: V) -> V:
        """Remember `value` for `key` (evicting the oldest entry when full); returns it."""
        if self.maxsize == 0:
            return value
        if key not in self and len(self) >= self.maxsize:
            try:
                del self[next(iter(self))]
            except (KeyError, RuntimeError, StopIteration):  # raced with another thread
                self.clear()
        self[key] = value
        return value

    def get_or(self, key: K, compute: Callable[[K], V]) -> V:
        """The remembered value for `key`, computing and remembering it on a miss."""
        try:
            return self[key]
        except KeyError:
            return self.put(key, compute(key))
