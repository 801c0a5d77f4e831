"""One check, as the data flows: identity -> decision cache -> policy -> rate limit.

`Authorizer.check` is the whole pure core behind the gRPC servicer. It never raises for a
bad request: every path ends in a Decision, and the servicer turns any unexpected exception
into a fail-closed 503 (see server.py), never an allow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from extauthz.decide.cache import DecisionCache
from extauthz.decide.ratelimit import (
    Limit,
    LimitResult,
    LocalLimiter,
    principal_key,
    rate_limit_headers,
    rule_key,
)
from extauthz.identity.resolver import IdentityResolver, www_authenticate
from extauthz.model import Decision, Identity, IdentityFailure, Outcome, Reason, Request
from extauthz.policy.compiled import CompiledPolicy, query_method_override
from extauthz.policy.connections import (
    ConnectionTable,
    compile_connections,
    connection_rules,
    destination_port,
    principal_ids,
)
from extauthz.policy.document import METHODS, LimitDecl
from extauthz.policy.paths import normalize_path

MAX_HOST_LENGTH = 255
HOST_MEMO_SIZE = 1024
_UNSEEN = "\0unseen"
REALM = "extauthz"


class PolicySource(Protocol):
    """Where the current compiled policy comes from; swapped atomically on reload."""

    @property
    def current(self) -> CompiledPolicy | None: ...


class Limiter(Protocol):
    async def hit_many(self, items: Sequence[tuple[str, Limit]]) -> LimitResult: ...


@dataclass(frozen=True, slots=True)
class CheckResult:
    decision: Decision
    cache_hit: bool = False
    limit: LimitResult | None = None
    # This request's verified identity. On a cache hit `decision.identity` is the identity of
    # the request that filled the entry (same principal, source and issuer, but its own
    # notes and expiry), so per-request details are read from here.
    identity: Identity | None = None


def normalize_host(raw: str) -> str | None:
    """Lowercase and drop the port: `Orders.Mesh:8443` -> `orders.mesh`."""
    if not raw or len(raw) > MAX_HOST_LENGTH:
        return None
    host = raw.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else None
    colon = host.rfind(":")
    if colon >= 0:
        if not host[colon + 1 :].isdigit():
            return None
        host = host[:colon]
    if not host or any(c <= " " or c in "/\\@" for c in host):
        return None
    return host


def _limit(decl: LimitDecl) -> Limit:
    return Limit(rate=decl.rate, period=decl.period, burst=decl.burst)


class Authorizer:
    def __init__(
        self,
        policy: PolicySource,
        identity: IdentityResolver,
        cache: DecisionCache,
        clock: Callable[[], float],
        limiter: Limiter | None = None,
    ) -> None:
        self._policy = policy
        self._identity = identity
        self._cache = cache
        self._clock = clock
        self._limiter = limiter
        # Raw Host header -> normalized host: a mesh has few hosts, and normalizing costs more
        # than the lookup. Bounded; a flood of distinct hosts only clears it.
        self._hosts: dict[str, str | None] = {}
        # Connection rules (network ext_authz) compiled for the policy they were built from.
        self._connections: tuple[CompiledPolicy, ConnectionTable] | None = None

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
    def identity(self) -> IdentityResolver:
        return self._identity

    @identity.setter
    def identity(self, resolver: IdentityResolver) -> None:
        """Swap the resolver (e.g. a new revocation list); one attribute write, so a check
        in flight uses either the old or the new one, never a mix."""
        self._identity = resolver

    async def check(self, request: Request) -> CheckResult:
        policy = self._policy.current
        if policy is None:
            return CheckResult(
                Decision(Outcome.UNAVAILABLE, Reason.POLICY_NOT_LOADED, "no policy is loaded yet")
            )
        now = self._clock()
        found = self._identity.resolve(request, now)
        if not isinstance(found, Identity):
            return CheckResult(_unauthenticated(found, policy.version))
        if not request.is_http:
            # Envoy's network (TCP) ext_authz filter: one check per connection, by identity,
            # destination port and SNI only (see network_policy.py).
            return CheckResult(self._connection(policy, found, request))
        method = request.method
        if method not in METHODS:
            return CheckResult(
                Decision(
                    Outcome.FORBIDDEN,
                    Reason.MALFORMED_REQUEST,
                    "unsupported or missing HTTP method",
                    identity=found,
                    policy_version=policy.version,
                )
            )
        host = self._hosts.get(request.host, _UNSEEN)
        if host is _UNSEEN:
            host = normalize_host(request.host)
            if len(self._hosts) >= HOST_MEMO_SIZE:
                self._hosts.clear()
            self._hosts[request.host] = host
        path = normalize_path(request.path)
        if host is None or path is None:
            what = "host" if host is None else "path"
            return CheckResult(
                Decision(
                    Outcome.FORBIDDEN,
                    Reason.AMBIGUOUS_PATH if path is None else Reason.MALFORMED_REQUEST,
                    f"the request {what} is malformed or ambiguous",
                    identity=found,
                    policy_version=policy.version,
                )
            )
        override = query_method_override(method, request.path) if "?" in request.path else ""
        if override:
            return CheckResult(
                Decision(
                    Outcome.FORBIDDEN,
                    Reason.METHOD_OVERRIDE,
                    override,
                    identity=found,
                    policy_version=policy.version,
                )
            )
        # The key part holds the issuer and every header/claim value (and the minute, for
        # time conditions) that the rules of this host read: see CompiledPolicy.cache_key_part.
        key = (
            found.principal,
            found.source,
            method,
            host,
            path,
            policy.version,
            policy.cache_key_part(host, request.headers, found, now),
        )
        decision = self._cache.get(key)
        cache_hit = decision is not None
        if decision is None:
            decision = policy.evaluate(
                found, host, method, path, headers=request.headers, now=now
            ).decision
            self._cache.put(key, decision)
        if not decision.allowed or self._limiter is None:
            return CheckResult(decision, cache_hit, identity=found)
        return await self._apply_limits(policy, decision, cache_hit, found)

    def _connection(self, policy: CompiledPolicy, identity: Identity, request: Request) -> Decision:
        compiled = self._connections
        if compiled is None or compiled[0] is not policy:
            table = compile_connections(
                connection_rules(policy.documents), principal_ids(policy.principals)
            )
            self._connections = compiled = (policy, table)
        port = destination_port(request.context_extensions)
        if not port:
            return Decision(
                Outcome.FORBIDDEN,
                Reason.MALFORMED_REQUEST,
                "the check has no HTTP attributes and no destination port",
                identity=identity,
                policy_version=policy.version,
            )
        return compiled[1].evaluate(identity, port, request.host, policy.version)

    async def _apply_limits(
        self, policy: CompiledPolicy, decision: Decision, cache_hit: bool, identity: Identity
    ) -> CheckResult:
        assert self._limiter is not None
        principal = decision.principal
        items: list[tuple[str, Limit]] = []
        declared = policy.declared_principal(decision.identity or principal)
        if declared is not None and declared.limit is not None:
            items.append((principal_key(principal), _limit(declared.limit)))
        if decision.rule:
            rule_limit = policy.rule_limit(decision.rule)
            if rule_limit is not None:
                items.append((rule_key(principal, decision.rule), _limit(rule_limit)))
        if not items:
            return CheckResult(decision, cache_hit, identity=identity)
        result = await self._limiter.hit_many(items)
        if not result.allowed:
            # A backend failure under fail-closed is an outage (503), never the caller's 429.
            outcome, reason, detail = (
                (Outcome.UNAVAILABLE, Reason.RATELIMIT_UNAVAILABLE, "rate-limit backend down")
                if result.backend_error
                else (Outcome.RATE_LIMITED, Reason.RATE_LIMITED, "rate limit exceeded")
            )
            limited = replace(
                decision,
                outcome=outcome,
                reason=reason,
                detail=detail,
                headers=rate_limit_headers(result),
            )
            return CheckResult(limited, cache_hit, result, identity)
        return CheckResult(decision, cache_hit, result, identity)


class InProcessLimiter:
    """The local GCRA limiter behind the async Limiter interface (no I/O, never awaits)."""

    def __init__(self, limiter: LocalLimiter) -> None:
        self._limiter = limiter

    async def hit_many(self, items: Sequence[tuple[str, Limit]]) -> LimitResult:
        return self._limiter.hit_many(items)


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
