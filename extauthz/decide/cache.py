"""A bounded cache of policy decisions that can never serve a stale or foreign answer.

Safety comes from the key, not from invalidation: the key holds everything the policy
evaluation read (principal and identity source, method, host, normalized path, the policy
version and any header/claim value a rule reads). A new policy version therefore misses by
construction, and old entries age out of the LRU. Entries also never outlive the credential
that produced them (`Identity.expires_at`), nor the configured TTL.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple

from cachetools import TLRUCache

from extauthz.decide.ratelimit import Limit
from extauthz.model import Decision


class CachedDecision(NamedTuple):
    """A decision and the rate limits it is subject to, ready for the limiter: a cache hit
    needs nothing more from the policy. (A tuple: made on every miss, it must be cheap.)"""

    decision: Decision
    limits: tuple[tuple[str, Limit], ...] = ()


class DecisionCache:
    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float]) -> None:
        if maxsize < 0 or ttl < 0:
            raise ValueError("cache size and TTL must not be negative")
        self._ttl = ttl
        self._enabled = maxsize > 0 and ttl > 0
        self._cache: TLRUCache[Hashable, CachedDecision] = TLRUCache(
            maxsize=max(maxsize, 1), ttu=self._expires, timer=clock
        )
        self.hits = 0
        self.misses = 0

    def _expires(self, _key: Hashable, entry: CachedDecision, now: float) -> float:
        expiry = now + self._ttl
        identity = entry.decision.identity
        if identity is not None and identity.expires_at is not None:
            expiry = min(expiry, identity.expires_at)
        return expiry

    def get(self, key: Hashable) -> CachedDecision | None:
        if not self._enabled:
            return None
        found = self._cache.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: Hashable, entry: CachedDecision) -> None:
        if self._enabled:
            self._cache[key] = entry

    @property
    def size(self) -> int:
        return len(self._cache)

    @property
    def maxsize(self) -> int:
        return int(self._cache.maxsize)

    def clear(self) -> None:
        self._cache.clear()
