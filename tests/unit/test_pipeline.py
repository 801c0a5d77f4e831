import asyncio

from extauthz.decide.cache import DecisionCache
from extauthz.decide.guards import normalize_host
from extauthz.decide.pipeline import Authorizer, CheckResult
from extauthz.decide.ratelimit import InProcessLimiter, LocalLimiter
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
