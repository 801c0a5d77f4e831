"""The decision cache must never serve a decision made for other header, claim or time values.

Rules that read headers (`headers:` or `when:`), claims or the time make the decision depend on
them; `CompiledPolicy.cache_key_part` puts their values in the key. Each test here fails if
that part of the key is dropped.
"""

import asyncio
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.decide.cache import DecisionCache
from extauthz.decide.pipeline import Authorizer, decide
from extauthz.model import Decision, Identity, IdentitySource, Reason, Request
from extauthz.policy.compiled import CompiledPolicy

from .conftest import Clock
from .policy_fixtures import CHECKOUT, compiled

HOST = "orders.mesh.local"
MONDAY_10AM = datetime(2025, 1, 6, 10, 0, tzinfo=UTC).timestamp()
RULES = [
    {"name": "tenant", "methods": ["GET"], "path_prefix": "/v1/orders", "allow": ["checkout"],
     "headers": {"x-tenant": "acme", "x-debug": {"present": False}}},
    {"name": "scoped", "methods": ["POST"], "path": "/v1/orders", "allow": ["checkout"],
     "when": 'claims.scope == "orders:write" && headers["x-region"].startsWith("eu-")'},
    {"name": "office-hours", "methods": ["DELETE"], "path_prefix": "/v1/orders",
     "allow": ["checkout"], "when": "now.getHours() >= 9 && now.getHours() < 17"},
]


class Holder:
    def __init__(self, policy: CompiledPolicy) -> None:
        self.current: CompiledPolicy | None = policy


class Caller:
    """Stands in for the identity resolver: the test sets who is calling."""

    def __init__(self) -> None:
        self.identity = Identity(CHECKOUT, IdentitySource.MTLS, "prod.example")

    def resolve(self, _request: Request, _now: float) -> Identity:
        return self.identity


def make() -> tuple[Authorizer, Caller, Clock, CompiledPolicy]:
    clock, caller, policy = Clock(MONDAY_10AM), Caller(), compiled(RULES)
    authz = Authorizer(Holder(policy), caller, DecisionCache(1000, 3600, clock), clock)  # type: ignore[arg-type]
    return authz, caller, clock, policy


def check(authz: Authorizer, method: str, path: str, headers: dict[str, str]) -> tuple[Decision, bool]:
    r = asyncio.run(authz.check(Request(method=method, host=HOST, path=path, headers=headers,
                                        source_principal=CHECKOUT)))
    return r.decision, r.cache_hit


def test_header_values_are_part_of_the_key() -> None:
    authz, *_ = make()
    assert check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme"})[0].allowed
    evil, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "evil"})
    assert (evil.allowed, hit) == (False, False)
    debug, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme", "x-debug": "1"})
    assert (debug.allowed, hit) == (False, False)
    again, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme", "x-request-id": "z"})
    assert (again.allowed, hit) == (True, True)  # a header no rule reads is not in the key


def test_a_cached_deny_is_not_served_to_the_right_header_value() -> None:
    authz, *_ = make()
    assert not check(authz, "GET", "/v1/orders/1", {})[0].allowed
    ok, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme"})
    assert (ok.allowed, hit) == (True, False)


def test_claim_values_read_by_conditions_are_part_of_the_key() -> None:
    authz, caller, _, _ = make()
    svid = dict(principal=CHECKOUT, source=IdentitySource.JWT, trust_domain="prod.example",
                issuer="https://spire", subject=CHECKOUT)
    caller.identity = Identity(**svid, claims={"scope": "orders:write"})  # type: ignore[arg-type]
    assert check(authz, "POST", "/v1/orders", {"x-region": "eu-1"})[0].allowed
    caller.identity = Identity(**svid, claims={"scope": "orders:read"})  # type: ignore[arg-type]
    other, hit = check(authz, "POST", "/v1/orders", {"x-region": "eu-1"})
    assert (other.allowed, hit) == (False, False)
    caller.identity = Identity(**svid, claims={"scope": "orders:write"})  # type: ignore[arg-type]
    region, hit = check(authz, "POST", "/v1/orders", {"x-region": "us-1"})
    assert (region.allowed, hit) == (False, False)


def test_time_conditions_are_keyed_by_the_minute() -> None:
    authz, _, clock, _ = make()
    clock.now = datetime(2025, 1, 6, 16, 59, 10, tzinfo=UTC).timestamp()
    assert check(authz, "DELETE", "/v1/orders/1", {})[0].allowed
    clock.now += 40
    assert check(authz, "DELETE", "/v1/orders/1", {})[1]  # same minute: cached
    clock.now += 20  # 17:00:10, well within the cache TTL
    late, hit = check(authz, "DELETE", "/v1/orders/1", {})
    assert (late.allowed, hit) == (False, False)


def test_a_method_override_header_is_refused_before_the_cache_and_never_keyed() -> None:
    authz, *_ = make()
    assert check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme"})[0].allowed
    over, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme", "x-http-method": "DELETE"})
    assert (over.reason, hit) == (Reason.METHOD_OVERRIDE, False)
    # An override naming the request's own method changes nothing, so it shares the entry.
    same, hit = check(authz, "GET", "/v1/orders/1", {"x-tenant": "acme", "x-http-method": "GET"})
    assert (same.allowed, hit) == (True, True)
    assert authz._cache.size == 1


_HEADERS = st.fixed_dictionaries({}, optional={
    "x-tenant": st.sampled_from(["acme", "evil", ""]),
    "x-debug": st.sampled_from(["", "1"]),
    "x-region": st.sampled_from(["eu-1", "us-1"]),
    "x-http-method-override": st.sampled_from(["GET", "POST"]),
    "x-request-id": st.sampled_from(["a", "b"]),
})
_REQUEST = st.tuples(st.sampled_from(["GET", "POST", "DELETE"]), _HEADERS,
                     st.sampled_from(["orders:write", "orders:read", None]),
                     st.sampled_from([8, 10, 16, 17]))


@settings(max_examples=60, deadline=None)
@given(st.lists(_REQUEST, min_size=2, max_size=25))
def test_cached_answers_always_equal_fresh_evaluation(requests: list) -> None:  # type: ignore[type-arg]
    authz, caller, clock, policy = make()
    for method, headers, scope, hour in requests:
        claims = {"scope": scope} if scope is not None else {}
        caller.identity = Identity(CHECKOUT, IdentitySource.JWT, "prod.example",
                                   issuer="https://spire", subject=CHECKOUT, claims=claims)
        clock.now = datetime(2025, 1, 6, hour, 30, tzinfo=UTC).timestamp()
        path = "/v1/orders" if method == "POST" else "/v1/orders/1"
        got, _ = check(authz, method, path, headers)
        fresh = decide(policy, caller.identity,
                       Request(method=method, host=HOST, path=path, headers=headers), clock.now)
        assert (got.reason, got.rule, got.allowed) == (fresh.reason, fresh.rule, fresh.allowed)
