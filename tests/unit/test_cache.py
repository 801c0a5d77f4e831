"""The decision cache never serves a stale or foreign answer, and never outgrows its bound."""

from __future__ import annotations

import asyncio
import tracemalloc

from extauthz.decide.cache import CachedDecision, DecisionCache
from extauthz.decide.pipeline import Authorizer
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request

from .policy_fixtures import CHECKOUT, compiled
from .test_pipeline import HOST, RULES, Clock, Holder


class Expiring:
    """An identity source whose credential expires at a chosen instant."""

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    def resolve(self, request: Request, now: float) -> Identity:
        return Identity(request.source_principal, IdentitySource.MTLS, "prod.example",
                        expires_at=self.expires_at)


def _authz(clock: Clock, resolver: object, size: int = 100, ttl: float = 60) -> Authorizer:
    return Authorizer(Holder(compiled(RULES)), resolver, DecisionCache(size, ttl, clock), clock)  # type: ignore[arg-type]


def _check(authz: Authorizer, **kw: str) -> tuple[bool, bool]:
    fields = {"method": "GET", "host": HOST, "path": "/v1/orders/1", "source_principal": CHECKOUT, **kw}
    result = asyncio.run(authz.check(Request(**fields)))  # type: ignore[arg-type]
    return result.cache_hit, result.decision.allowed


def test_entry_never_outlives_the_credential_that_made_it() -> None:
    clock = Clock()
    source = Expiring(clock.now + 5)
    authz = _authz(clock, source)
    assert _check(authz) == (False, True)
    assert _check(authz) == (True, True)
    clock.now += 6  # the certificate's notAfter has passed; a renewed one arrives
    source.expires_at = clock.now + 3600
    assert _check(authz)[0] is False


def test_entry_never_outlives_the_ttl() -> None:
    clock = Clock()
    authz = _authz(clock, Expiring(clock.now + 3600), ttl=10)
    _check(authz)
    clock.now += 9
    assert _check(authz)[0] is True
    clock.now += 2
    assert _check(authz)[0] is False


def test_an_already_expired_credential_is_never_cached() -> None:
    clock = Clock()
    authz = _authz(clock, Expiring(clock.now - 1))
    assert _check(authz)[0] is False
    assert _check(authz)[0] is False


def test_host_variants_share_the_normalized_entry_and_other_hosts_do_not() -> None:
    clock = Clock()
    authz = _authz(clock, Expiring(clock.now + 3600))
    assert _check(authz, host="orders.mesh.local") == (False, True)
    assert _check(authz, host="ORDERS.mesh.local:8443") == (True, True)
    assert _check(authz, host="billing.mesh.local") == (False, False)


def test_path_variants_resolve_before_the_lookup() -> None:
    clock = Clock()
    authz = _authz(clock, Expiring(clock.now + 3600))
    assert _check(authz, path="/v1/orders/1") == (False, True)
    assert _check(authz, path="//v1/./orders/1?x=1") == (True, True)
    # a cached allow for /v1/orders/1 is never served for a path that only looks alike
    assert _check(authz, path="/v1/orders/1/../../admin") == (False, False)
    assert _check(authz, path="/v1/orders/1%2F") == (False, False)


def test_a_flood_of_distinct_paths_never_grows_past_the_bound() -> None:
    clock = Clock()
    cache = DecisionCache(1000, 60, clock)
    decision = CachedDecision(Decision(Outcome.ALLOW, Reason.ALLOWED))
    for i in range(1_000_000):
        cache.put(("p", f"/flood/{i}"), decision)
    assert cache.size == 1000
    tracemalloc.start()  # and a further flood allocates nothing that stays
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            cache.put(("q", f"/more/{i}"), decision)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert cache.size == 1000
    assert grown < 500_000, f"cache memory grew by {grown} bytes under a 100k-path flood"


def test_disabled_cache_stores_nothing() -> None:
    clock = Clock()
    cache = DecisionCache(0, 60, clock)
    cache.put(("k",), CachedDecision(Decision(Outcome.ALLOW, Reason.ALLOWED)))
    assert cache.get(("k",)) is None and cache.size == 0
