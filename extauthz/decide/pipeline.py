"""One check, one pass: identity -> guards -> decision cache -> compiled policy -> rate limits.

`Authorizer.check` is the whole pure core behind a transport. It never raises for a bad
request: every path ends in a Decision, and the transport turns any unexpected exception into
a fail-closed 503, never an allow.

The pass, in order, each step done once:
1. host and path are normalized (the host through a memo: a mesh has few hosts);
2. no policy loaded: 503; no or a bad credential: 401 (identity/resolver.py);
3. the guards (guards.py): method, malformed host, ambiguous path, method overrides by query
   or header: 403 — before the cache, so nothing they read is part of a cache key;
4. the decision cache, keyed by everything the policy reads; an entry holds the decision and
   the ready (key, Limit) pairs it is subject to, so a hit never goes back to the policy;
5. on a miss, the compiled policy decides and names the limits;
6. the limiter, when the decision allows and limits apply.
The result carries the normalized host and path, so observers never normalize again.

`decide` is steps 3 and 5 alone, synchronous, for the offline tools (`explain`, `test`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import NamedTuple, Protocol

from extauthz.decide.cache import CachedDecision, DecisionCache
from extauthz.decide.guards import Refusal, Route, guard, normalize_host
from extauthz.decide.ratelimit import Limiter, LimitResult, rate_limit_headers
from extauthz.identity.resolver import www_authenticate
from extauthz.memo import Memo
from extauthz.model import Decision, Identity, IdentityFailure, Outcome, Reason, Request
from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.paths import normalize_path

HOST_MEMO_SIZE = 1024
_UNSEEN = "\0unseen"  # compared by identity: no Host header value is this object
REALM = "extauthz"


class PolicySource(Protocol):
    """Where the current compiled policy comes from; swapped atomically on reload."""

    @property
    def current(self) -> CompiledPolicy | None: ...


class IdentitySource(Protocol):
    """Who is calling (identity/resolver.py's IdentityResolver, or a given caller)."""

    def resolve(self, request: Request, now: float) -> Identity | IdentityFailure | None: ...


class CheckResult(NamedTuple):
    """What one check decided, for the transport and the observers. Immutable; a tuple
    because one is made per check and a frozen dataclass costs three times as much."""

    decision: Decision
    cache_hit: bool = False
    limit: LimitResult | None = None
    # This request's verified identity. On a cache hit `decision.identity` is the identity of
    # the request that filled the entry (same principal, source and issuer, but its own
    # notes and expiry), so per-request details are read from here.
    identity: Identity | None = None
    # The request's host and path as the policy sees them (normalized once, in step 1); None
    # for a network check or a value that is malformed or ambiguous.
    host: str | None = None
    path: str | None = None


def decide(
    policy: CompiledPolicy, identity: Identity, request: Request, now: float
) -> Decision:
    """The decision for a verified caller, without cache or limits: the guards, then the
    policy. Synchronous, for `explain` and `extauthz test`; `Authorizer.check` runs the very
    same two steps around its cache."""
    route = guard(request, normalize_host(request.host), normalize_path(request.path))
    if isinstance(route, Refusal):
        return _refused(route, identity, policy.version)
    return policy.evaluate(identity, route.host, route.method, route.path,
                           headers=request.headers, now=now).decision


class Authorizer:
    def __init__(
        self,
        policy: PolicySource,
        identity: IdentitySource,
        cache: DecisionCache,
        clock: Callable[[], float],
        limiter: Limiter | None = None,
    ) -> None:
        self._policy = policy
        self._identity = identity
        self._cache = cache
        self._clock = clock
        self._limiter = limiter
        # Raw Host header -> normalized host (None: malformed).
        self._hosts: Memo[str, str | None] = Memo(HOST_MEMO_SIZE)

    @property
    def limiter(self) -> Limiter | None:
        return self._limiter

    @property
    def policy_version(self) -> str:
        """The serving policy version ("" before the first load), for answers made outside
        `check` (e.g. the servicer's fail-closed error path)."""
        try:
            current = self._policy.current
        except Exception:
            return ""
        return current.version if current is not None else ""

    @property
    def identity(self) -> IdentitySource:
        return self._identity

    @identity.setter
    def identity(self, resolver: IdentitySource) -> None:
        """Swap the resolver (e.g. a new revocation list); one attribute write, so a check
        in flight uses either the old or the new one, never a mix."""
        self._identity = resolver

    async def check(self, request: Request) -> CheckResult:
        host: str | None = None
        path: str | None = None
        if request.is_http:
            host = self._hosts.get(request.host, _UNSEEN)
            if host is _UNSEEN:
                host = self._hosts.put(request.host, normalize_host(request.host))
            path = normalize_path(request.path)
        policy = self._policy.current
        if policy is None:
            return CheckResult(
                Decision(Outcome.UNAVAILABLE, Reason.POLICY_NOT_LOADED, "no policy is loaded yet"),
                host=host, path=path,
            )
        now = self._clock()
        found = self._identity.resolve(request, now)
        if not isinstance(found, Identity):
            return CheckResult(_unauthenticated(found, policy.version), host=host, path=path)
        if not request.is_http:
            # Envoy's network (TCP) ext_authz filter: one check per connection, by identity,
            # destination port and SNI only (see policy/connections.py).
            return CheckResult(_connection(policy, found, request), identity=found)
        route = guard(request, host, path)
        if isinstance(route, Refusal):
            return CheckResult(_refused(route, found, policy.version), identity=found,
                               host=host, path=path)
        entry, hit = self._lookup(policy, found, route, request.headers, now)
        if not entry.limits or self._limiter is None:
            return CheckResult(entry.decision, hit, identity=found, host=host, path=path)
        return await self._limit(entry, hit, found, route)

    def _lookup(self, policy: CompiledPolicy, identity: Identity, route: Route,
                headers: Mapping[str, str], now: float) -> tuple[CachedDecision, bool]:
        """The cached entry for this request (and True), or a fresh one from the policy."""
        # The key part holds the issuer and every header/claim value (and the minute, for
        # time conditions) that the rules of this host read: see CompiledPolicy.cache_key_part.
        key = (
            identity.principal,
            identity.source,
            route.method,
            route.host,
            route.path,
            policy.version,
            policy.cache_key_part(route.host, headers, identity, now),
        )
        entry = self._cache.get(key)
        if entry is not None:
            return entry, True
        decision = policy.evaluate(identity, route.host, route.method, route.path,
                                   headers=headers, now=now).decision
        entry = CachedDecision(decision, policy.limits(decision))
        self._cache.put(key, entry)
        return entry, False

    async def _limit(self, entry: CachedDecision, hit: bool, identity: Identity,
                     route: Route) -> CheckResult:
        assert self._limiter is not None
        result = await self._limiter.hit_many(entry.limits)
        return CheckResult(limited(entry.decision, result), hit, result, identity, route.host,
                           route.path)


def limited(decision: Decision, result: LimitResult) -> Decision:
    """The decision once the limiter answered: unchanged when it allows; a 429 when the caller
    is over its limit; a 503 when the backend failed closed (an outage, never the caller's
    429). Shared by the server and the offline tools' synchronous series."""
    if result.allowed:
        return decision
    outcome, reason, detail = (
        (Outcome.UNAVAILABLE, Reason.RATELIMIT_UNAVAILABLE, "rate-limit backend down")
        if result.backend_error
        else (Outcome.RATE_LIMITED, Reason.RATE_LIMITED, "rate limit exceeded")
    )
    return replace(decision, outcome=outcome, reason=reason, detail=detail,
                   headers=rate_limit_headers(result))


def _refused(refusal: Refusal, identity: Identity, version: str) -> Decision:
    return Decision(Outcome.FORBIDDEN, refusal.reason, refusal.detail, identity=identity,
                    policy_version=version)


def _connection(policy: CompiledPolicy, identity: Identity, request: Request) -> Decision:
    port = request.destination_port
    if not port:
        return Decision(
            Outcome.FORBIDDEN,
            Reason.MALFORMED_REQUEST,
            "the check has no HTTP attributes and no destination port",
            identity=identity,
            policy_version=policy.version,
        )
    return policy.connections.evaluate(identity, port, request.host, policy.version)


def _unauthenticated(found: IdentityFailure | None, version: str) -> Decision:
    if found is None:
        failure = IdentityFailure(Reason.NO_IDENTITY, "no workload identity was presented")
    else:
        failure = found
    return Decision(
        Outcome.UNAUTHENTICATED,
        failure.reason,
        failure.detail,
        policy_version=version,
        failure_source=failure.source,
        presented_principal=failure.presented,
        headers=(("www-authenticate", www_authenticate(failure, REALM)),),
    )
