import asyncio
from collections.abc import Sequence
from typing import Any

from extauthz.decide.cache import DecisionCache
from extauthz.decide.guards import normalize_host
from extauthz.decide.pipeline import HOST_MEMO_SIZE, Authorizer, CheckResult
from extauthz.decide.ratelimit import (
    InProcessLimiter,
    Limit,
    Limiter,
    LimitResult,
    LocalLimiter,
    principal_key,
    rule_key,
)
from extauthz.identity.resolver import IdentityConfig, IdentityResolver
from extauthz.model import Identity, IdentitySource, Outcome, Reason, Request
from extauthz.policy.compiled import CompiledPolicy

from .conftest import Clock
from .policy_fixtures import BILLING, CHECKOUT, compiled

HOST = "orders.mesh.local"
RULES = [
    {"name": "read", "methods": ["GET"], "path_prefix": "/v1/orders", "allow": ["checkout", "billing"]},
    {"name": "create", "methods": ["POST"], "path": "/v1/orders", "allow": ["checkout"],
     "limit": {"rate": 2, "period": "1s", "burst": 2}},
]


class Holder:
    def __init__(self, policy: CompiledPolicy | None) -> None:
        self.current = policy


def make(policy: CompiledPolicy | None = None, cache_size: int = 100, trust: frozenset[str] = frozenset()):  # type: ignore[no-untyped-def]
    clock = Clock()
    holder = Holder(policy if policy is not None else compiled(RULES))
    authz = Authorizer(
        holder,
        IdentityResolver.from_config(IdentityConfig(trust_domains=trust)),
        DecisionCache(cache_size, 60, clock),
        clock,
        InProcessLimiter(LocalLimiter(clock, 1000)),
    )
    return authz, holder, clock


def check(authz: Authorizer, principal: str = CHECKOUT, method: str = "GET",
          path: str = "/v1/orders/1", host: str = HOST, **kw: object) -> CheckResult:
    return asyncio.run(authz.check(Request(method=method, host=host, path=path,
                                           source_principal=principal, **kw)))  # type: ignore[arg-type]


def test_no_policy_loaded_fails_closed_with_503() -> None:
    authz, holder, _ = make()
    holder.current = None
    d = check(authz).decision
    assert (d.outcome, d.reason) == (Outcome.UNAVAILABLE, Reason.POLICY_NOT_LOADED)


def test_no_identity_is_401_with_www_authenticate() -> None:
    authz, _, _ = make()
    d = check(authz, principal="").decision
    assert (d.outcome.http_status, d.reason) == (401, Reason.NO_IDENTITY)
    assert dict(d.headers)["www-authenticate"].startswith("Bearer realm=\"extauthz\"")


def test_non_spiffe_principal_is_401_never_a_workload() -> None:
    authz, _, _ = make()
    for principal in ("orders.mesh.local", "CN=checkout,O=shop", "SPIFFE://prod.example/a",
                      "spiffe://prod.example/ns/../sa/x", "x" * 100_000):
        d = check(authz, principal=principal).decision
        assert (d.outcome.http_status, d.reason) == (401, Reason.INVALID_IDENTITY), principal


def test_untrusted_trust_domain_is_401() -> None:
    authz, _, _ = make(trust=frozenset({"prod.example"}))
    d = check(authz, principal="spiffe://evil.example/ns/shop/sa/checkout").decision
    assert (d.outcome.http_status, d.reason) == (401, Reason.UNTRUSTED_TRUST_DOMAIN)


def test_allowed_and_forbidden() -> None:
    authz, _, _ = make()
    ok = check(authz).decision
    assert (ok.allowed, ok.rule, ok.principal) == (True, "read", CHECKOUT)
    no = check(authz, principal=BILLING, method="POST", path="/v1/orders").decision
    assert (no.outcome.http_status, no.reason) == (403, Reason.PRINCIPAL_NOT_ALLOWED)


def test_no_http_attributes_is_denied() -> None:
    authz, _, _ = make()
    r = asyncio.run(authz.check(Request(source_principal=CHECKOUT, is_http=False)))
    assert (r.decision.outcome.http_status, r.decision.reason) == (403, Reason.MALFORMED_REQUEST)


def test_bad_method_host_and_ambiguous_paths_are_denied_before_rules() -> None:
    authz, _, _ = make()
    assert check(authz, method="get").decision.reason is Reason.MALFORMED_REQUEST
    assert check(authz, method="").decision.reason is Reason.MALFORMED_REQUEST
    assert check(authz, host="").decision.reason is Reason.MALFORMED_REQUEST
    assert check(authz, host="orders.mesh.local:abc").decision.reason is Reason.MALFORMED_REQUEST
    for path in ("/v1/orders%2F..%2Fadmin", "/v1/orders/..\\admin", "/v1/orders/\x00", "*", "http://x/v1/orders"):
        assert check(authz, path=path).decision.reason is Reason.AMBIGUOUS_PATH, path


def test_host_is_case_insensitive_and_port_ignored() -> None:
    authz, _, _ = make()
    assert check(authz, host="Orders.Mesh.Local:8443").decision.allowed
    assert normalize_host("[::1]:80") == "[::1]"
    assert normalize_host("a/b") is None


def test_path_normalization_reaches_the_rule_the_normalized_form_reaches() -> None:
    authz, _, _ = make()
    assert check(authz, path="/v1/admin/../orders/1").decision.allowed
    assert not check(authz, path="/v1/orders/../admin").decision.allowed


def test_cache_hit_is_reported_and_never_serves_another_principal() -> None:
    authz, _, _ = make()
    first = check(authz)
    second = check(authz)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert second.decision.allowed
    other = check(authz, principal="spiffe://prod.example/ns/shop/sa/cart")
    assert (other.cache_hit, other.decision.allowed) == (False, False)


def test_cache_never_serves_an_older_policy() -> None:
    authz, holder, _ = make()
    assert check(authz).decision.allowed
    holder.current = compiled([{"name": "read", "methods": ["GET"], "path_prefix": "/v1/orders",
                                "allow": ["billing"]}], version="v2")
    again = check(authz)
    assert (again.cache_hit, again.decision.allowed, again.decision.policy_version) == (False, False, "v2")


def test_cache_hit_does_not_skip_the_rate_limiter() -> None:
    authz, _, clock = make()
    statuses = [check(authz, method="POST", path="/v1/orders").decision.outcome.http_status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    limited = check(authz, method="POST", path="/v1/orders")
    assert limited.cache_hit
    headers = dict(limited.decision.headers)
    assert headers["retry-after"] == "1" and headers["ratelimit-remaining"] == "0"
    clock.now += 1.0
    assert check(authz, method="POST", path="/v1/orders").decision.allowed


def test_per_principal_limit_applies_across_rules() -> None:
    authz, _, _ = make()  # checkout: 3 per second across all rules
    answers = [check(authz, path=f"/v1/orders/{i}").decision.outcome.http_status for i in range(5)]
    assert answers == [200, 200, 200, 429, 429]
    assert check(authz, principal=BILLING).decision.allowed  # isolated from checkout


class _FixedIdentity:
    def __init__(self, identity: Identity) -> None:
        self._identity = identity

    def resolve(self, request: Request, now: float) -> Identity:
        return self._identity


def test_limits_of_jwt_principals_apply_by_issuer_and_subject() -> None:
    from extauthz.policy.compiled import compile_policy
    from extauthz.policy.document import parse_document

    from .policy_fixtures import doc

    policy = compile_policy([parse_document(doc(
        [{"name": "read", "methods": ["GET"], "path_prefix": "/v1", "allow": ["batch"]}],
        principals=[{"name": "batch", "jwt": {"issuer": "https://idp", "subject": "batch-job"},
                     "limit": {"rate": 1, "period": "60s", "burst": 1}}],
    ), "t.yaml")], "v1")
    clock = Clock()
    caller = Identity("batch-job", IdentitySource.JWT, "", issuer="https://idp", subject="batch-job")
    authz = Authorizer(Holder(policy), _FixedIdentity(caller), DecisionCache(10, 60, clock),  # type: ignore[arg-type]
                       clock, InProcessLimiter(LocalLimiter(clock, 100)))
    answers = [asyncio.run(authz.check(Request(method="GET", host=HOST, path="/v1/x"))).decision.outcome.http_status
               for _ in range(2)]
    assert answers == [200, 429]


class _RecordingLimiter:
    """A Limiter that remembers what it was asked and always allows."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, Limit], ...]] = []
        self.started = self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def hit_many(self, items: Sequence[tuple[str, Limit]], cost: int = 1) -> LimitResult:
        self.calls.append(tuple(items))
        return LimitResult(True, 10, 9, 0.0, 0.0)

    async def aclose(self) -> None:
        self.closed += 1


def test_a_cache_hit_uses_the_entry_limits_and_never_goes_back_to_the_policy() -> None:
    policy = compiled(RULES)
    clock = Clock()
    limiter = _RecordingLimiter()
    authz = Authorizer(Holder(policy), IdentityResolver.from_config(IdentityConfig()),
                       DecisionCache(100, 60, clock), clock, limiter)
    asked = {"evaluate": 0, "limits": 0, "declared_principal": 0, "rule_limit": 0}
    for name in asked:
        real = getattr(policy, name)

        def counted(*a: object, _real: Any = real, _name: str = name, **kw: object) -> Any:
            asked[_name] += 1
            return _real(*a, **kw)

        setattr(policy, name, counted)
    results = [check(authz, method="POST", path="/v1/orders") for _ in range(3)]
    assert [r.cache_hit for r in results] == [False, True, True]
    assert asked == {"evaluate": 1, "limits": 1, "declared_principal": 1, "rule_limit": 0}
    first = limiter.calls[0]
    assert [key for key, _ in first] == [principal_key(CHECKOUT), rule_key(CHECKOUT, "create")]
    # The very Limit objects the policy made at load, handed over on every hit.
    assert all(call == first and all(a[1] is b[1] for a, b in zip(call, first, strict=True))
               for call in limiter.calls)
    assert first[1][1] is policy.limits(results[0].decision)[1][1]


def test_the_result_carries_the_normalized_host_and_path_for_the_observers() -> None:
    authz, _, _ = make()
    r = check(authz, host="Orders.Mesh.Local:8443", path="/v1/admin/../orders/1?x=1")
    assert (r.host, r.path, r.decision.allowed) == (HOST, "/v1/orders/1", True)
    refused = check(authz, path="/v1/orders/%2F")  # ambiguous: no path, the host still known
    assert (refused.host, refused.path, refused.decision.reason) == (HOST, None, Reason.AMBIGUOUS_PATH)
    unauthenticated = check(authz, principal="")
    assert (unauthenticated.host, unauthenticated.path) == (HOST, "/v1/orders/1")


def test_a_query_method_override_is_refused_before_the_cache() -> None:
    authz, _, _ = make()
    over = check(authz, path="/v1/orders/1?_method=DELETE")
    assert (over.decision.reason, over.cache_hit) == (Reason.METHOD_OVERRIDE, False)
    assert authz._cache.size == 0


def test_a_flood_of_distinct_hosts_keeps_the_host_memo_bounded() -> None:
    authz, _, _ = make()
    for i in range(3 * HOST_MEMO_SIZE):
        check(authz, host=f"h{i}.mesh.local")
    assert len(authz._hosts) <= HOST_MEMO_SIZE
    assert check(authz).decision.allowed


def test_the_in_process_limiter_has_the_limiter_lifecycle() -> None:
    limiter: Limiter = InProcessLimiter(LocalLimiter(Clock(), 10))
    asyncio.run(limiter.start())
    result = asyncio.run(limiter.hit_many([("k", Limit(1, 1.0, 1))]))
    again = asyncio.run(limiter.hit_many([("k", Limit(1, 1.0, 1))]))
    asyncio.run(limiter.aclose())
    assert (result.allowed, again.allowed) == (True, False)
