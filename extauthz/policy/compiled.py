"""The policy compiled once: host lookup tables, connection table, limits, principals.

Everything a check needs from the policy is built here at load time, once per version: the
per-host lookup tables (tables.py), the connection table of the network filter
(connections.py), each principal's and rule's ready `Limit`, and the principal index. Per
request only lookups follow, never a scan of rules or a rebuild.

Evaluation of one HTTP request whose method, host and path passed the guards (decide/guards.py:
supported method, canonical host and path, no method override), in order (docs/policy.md):
1. Candidate rules: host, method and path match (exact, templates, regexes, then prefixes
   longest first). A candidate *applies* when all its `headers` match and its `when`
   condition is true. A condition that fails to evaluate counts as false for `allow` and as
   true for `deny` (fail closed).
2. An applying enforce-mode rule whose `deny` names the caller: 403 DENIED_BY_RULE.
3. Any applying rule whose `allow` names the caller: ALLOW (a dry-run deny that also applied
   marks the decision `dry_run`, reason DRY_RUN, so it is logged as "would deny").
4. Applying dry-run rules only: ALLOW, reason DRY_RUN ("would deny").
5. An enforced candidate naming the caller whose headers/when failed: 403 CONDITION_NOT_MET
   (the rule, and which condition). Else applying rules, none allows: 403
   PRINCIPAL_NOT_ALLOWED. None applies: 403 NO_MATCHING_RULE.
6. An allowed path with `;params` whose params-stripped form is not allowed: 403
   AMBIGUOUS_PATH (servers that strip params would serve the stripped route).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from extauthz.decide.ratelimit import Limit, principal_key, rule_key
from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import EMPTY, Decision, Identity, IdentitySource, Outcome, Reason
from extauthz.policy.conditions import TIME_GRANULARITY
from extauthz.policy.connections import ConnectionTable, compile_connections
from extauthz.policy.decls import LimitDecl, PolicyDocument, PrincipalDecl
from extauthz.policy.paths import without_params
from extauthz.policy.principals import jwt_matches
from extauthz.policy.reader import PolicyError
from extauthz.policy.rules import (
    CompiledHeader,
    CompiledRule,
    FilterResult,
    RequestInputs,
    compile_rule,
    path_matches,
)
from extauthz.policy.tables import HostTable, finish, index, regex_bucket

__all__ = [
    "CompiledHeader",
    "CompiledPolicy",
    "CompiledRule",
    "FilterResult",
    "Match",
    "RequestInputs",
    "compile_policy",
    "compile_rule",
    "path_matches",
    "regex_bucket",
]

Limits = tuple[tuple[str, Limit], ...]


@dataclass(frozen=True, slots=True)
class Match:
    decision: Decision
    considered: tuple[CompiledRule, ...]


class CompiledPolicy:
    def __init__(
        self,
        version: str,
        hosts: dict[str, HostTable],
        principals: dict[str, PrincipalDecl],
        rules: tuple[CompiledRule, ...],
        documents: tuple[PolicyDocument, ...],
        *,
        connections: ConnectionTable | None = None,
    ) -> None:
        self.version = version
        self._hosts = hosts
        self.principals = principals
        self.rules = rules
        self.documents = documents
        # Built once here (load time); the authorizer never rebuilds it per version.
        self.connections = (
            connections if connections is not None
            else compile_connections(documents, principals)
        )
        self._rule_limits = {r.name: r.limit for r in rules if r.limit is not None}
        self._ready_rule_limits = {
            r.name: _ready(r.limit, r.source, f"rules[{r.name}].limit", r.decl.line)
            for r in rules if r.limit is not None
        }
        self._ready_principal_limits = {
            p.name: _ready(p.limit, p.source, f"principals[{p.name}].limit", p.line)
            for p in principals.values() if p.limit is not None
        }
        spiffe = [p for p in principals.values() if p.spiffe]
        self._exact_principals = {
            p.spiffe: p for p in spiffe if SpiffePattern.parse(p.spiffe).is_exact
        }
        self._pattern_principals = [
            (SpiffePattern.parse(p.spiffe), p)
            for p in spiffe
            if not SpiffePattern.parse(p.spiffe).is_exact
        ]
        self._jwt_principals = [p for p in principals.values() if p.jwt is not None]

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(sorted(self._hosts))

    def rules_for_host(self, host: str) -> tuple[CompiledRule, ...]:
        table = self._hosts.get(host)
        return tuple(table.rules) if table is not None else ()

    def rule_limit(self, rule: str) -> LimitDecl | None:
        return self._rule_limits.get(rule)

    def limits(self, decision: Decision) -> Limits:
        """The rate limits an allowed decision is subject to, as (key, Limit) pairs: the
        caller's declared principal's, then the allowing rule's. Built from the Limit objects
        made at load; the decision cache keeps the answer next to the decision, so a cache hit
        never comes back here."""
        identity = decision.identity
        if identity is None or not decision.allowed:
            return ()
        by_principal: Limit | None = None
        if self._ready_principal_limits:
            declared = self.declared_principal(identity)
            if declared is not None:
                by_principal = self._ready_principal_limits.get(declared.name)
        by_rule = self._ready_rule_limits.get(decision.rule) if decision.rule else None
        principal = identity.principal
        if by_principal is None:
            return () if by_rule is None else ((rule_key(principal, decision.rule), by_rule),)
        first = (principal_key(principal), by_principal)
        if by_rule is None:
            return (first,)
        return (first, (rule_key(principal, decision.rule), by_rule))

    def declared_principal(self, who: str | Identity) -> PrincipalDecl | None:
        """The declaration an identity belongs to (JWT matches, exact IDs, then patterns)."""
        if isinstance(who, Identity):
            if self._jwt_principals and who.source is IdentitySource.JWT:
                for decl in self._jwt_principals:
                    assert decl.jwt is not None
                    if jwt_matches(decl.jwt, who):
                        return decl
            principal = who.principal
        else:
            principal = who
        found = self._exact_principals.get(principal)
        if found is not None or not self._pattern_principals:
            return found
        try:
            sid = parse_spiffe_id(principal)
        except SpiffeIdError:
            return None
        for pattern, decl in self._pattern_principals:
            if pattern.matches(sid):
                return decl
        return None

    def cache_key_part(
        self, host: str, headers: Mapping[str, str], identity: Identity, now: float
    ) -> tuple[object, ...]:
        """Everything besides principal/method/host/path that a decision for `host` reads:
        the issuer, and the values of every header and claim any rule of this host reads
        (plus the minute, if a condition reads the time). Method-override headers are not
        here: the guards refuse them before the cache (decide/guards.py)."""
        table = self._hosts.get(host)
        if table is None or not table.filtered:
            return (identity.issuer,)
        part: list[object] = [identity.issuer]
        if headers:
            part += [headers.get(h) for h in table.header_names]
        if table.claim_names:
            claims = identity.claims
            part += [_claim_key(claims.get(c)) for c in table.claim_names]
        if table.uses_time:
            part.append(int(now // TIME_GRANULARITY))
        return tuple(part)

    def candidates(self, host: str, method: str, path: str) -> list[CompiledRule]:
        """Rules whose host, method and path match: exact, templates, regexes, then prefixes
        (longest first). Headers and conditions are not looked at here."""
        table = self._hosts.get(host)
        return table.candidates(method, path) if table is not None else []

    def evaluate(
        self,
        identity: Identity,
        host: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] = EMPTY,
        now: float = 0.0,
    ) -> Match:
        """Decide one request that passed the guards (canonical host and path, no override).

        A path with `;params` is allowed only if the same request without them (as Tomcat,
        Jetty and Spring route it) is allowed too: `/v1/admin;x/users` must not slip past a
        deny on `/v1/admin` into an upstream that serves it as `/v1/admin/users`."""
        match = self._evaluate(identity, host, method, path, headers=headers, now=now)
        if ";" not in path or not match.decision.allowed:
            return match
        bare = without_params(path)
        if bare == path:
            return match
        if bare is not None and self._evaluate(
                identity, host, method, bare, headers=headers, now=now).decision.allowed:
            return match
        detail = (f"path parameters (';') change the answer: {bare} is not allowed"
                  if bare is not None else "path parameters (';') make the path ambiguous")
        return Match(Decision(Outcome.FORBIDDEN, Reason.AMBIGUOUS_PATH, detail,
                              identity=identity, policy_version=self.version), match.considered)

    def _evaluate(self, identity: Identity, host: str, method: str, path: str, *,
                  headers: Mapping[str, str], now: float) -> Match:
        route = self.candidates(host, method, path)
        applied: list[tuple[CompiledRule, bool, bool]] = []
        inputs: RequestInputs | None = None
        # The first enforced rule that names the caller but whose headers/when failed: why a
        # caller that a rule would allow is denied (condition_not_met, not no_matching_rule).
        unmet: tuple[CompiledRule, FilterResult] | None = None
        for rule in route:
            if not rule.filtered:
                applied.append((rule, True, True))
                continue
            if inputs is None:
                inputs = RequestInputs(identity, host, method, path, headers, now)
            result = rule.filters(inputs)
            allows, denies = rule.applies(result)
            if allows or denies:
                applied.append((rule, allows, denies))
            if (not allows and unmet is None and not rule.dry_run and rule.allow
                    and rule.allow.contains(identity)):
                unmet = (rule, result)
        considered = tuple(r for r, _, _ in applied)
        if not applied and unmet is not None:
            return Match(_unmet(unmet, headers, identity, self.version), considered)
        if not applied:
            detail = ("rules for this route do not match its headers or conditions" if route
                      else "no rule matches this route")
            return Match(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE, detail,
                                  identity=identity, policy_version=self.version), considered)
        return Match(self._verdict(identity, applied, considered, unmet, headers), considered)

    def _verdict(self, identity: Identity, applied: list[tuple[CompiledRule, bool, bool]],
                 considered: tuple[CompiledRule, ...],
                 unmet: tuple[CompiledRule, FilterResult] | None,
                 headers: Mapping[str, str]) -> Decision:
        """Steps 2-5 over the rules that apply: deny, allow, dry-run, not allowed."""
        version = self.version
        would_deny: CompiledRule | None = None
        for rule, _, denies in applied:
            if denies and rule.deny and rule.deny.contains(identity):
                if not rule.dry_run:
                    return Decision(Outcome.FORBIDDEN, Reason.DENIED_BY_RULE,
                                    f"denied by rule {rule.name}", rule=rule.name,
                                    identity=identity, policy_version=version)
                would_deny = would_deny or rule
        for rule, allows, _ in applied:
            if allows and rule.allow and rule.allow.contains(identity):
                if would_deny is not None:
                    return _dry_run(would_deny, identity, version, allow_rule=rule.name)
                return Decision(Outcome.ALLOW, Reason.ALLOWED, rule=rule.name, identity=identity,
                                policy_version=version)
        enforced = [r for r in considered if not r.dry_run]
        if not enforced:
            return _dry_run(considered[0], identity, version)
        if unmet is not None:  # a rule would allow the caller, but for its condition
            return _unmet(unmet, headers, identity, version)
        return Decision(Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED,
                        "no rule for this route allows the caller", rule=enforced[0].name,
                        identity=identity, policy_version=version)


def _unmet(unmet: tuple[CompiledRule, FilterResult], headers: Mapping[str, str],
           identity: Identity, version: str) -> Decision:
    rule, result = unmet
    return Decision(Outcome.FORBIDDEN, Reason.CONDITION_NOT_MET,
                    unmet_condition(rule, result, headers), rule=rule.name, identity=identity,
                    policy_version=version)


def unmet_condition(rule: CompiledRule, result: FilterResult,
                    headers: Mapping[str, str]) -> str:
    """Which of the rule's conditions failed, never with a header's value (it may be a
    credential): `header x-tenant-id is missing`, `when '...' is false`."""
    h = result.failed_header
    if h is not None:
        if h.kind == "absent":
            return f"rule {rule.name}: header {h.name} must be absent"
        if headers.get(h.name) is None:
            return f"rule {rule.name}: header {h.name} is missing"
        want = f"= {h.value!r}" if h.kind == "exact" else f"~ {h.value!r}"
        return f"rule {rule.name}: header {h.name} does not match {want}"
    when = rule.decl.when
    if isinstance(result.condition, str):
        error = result.condition
        if not error.startswith(("header ", "claim ")):  # a runtime error may quote values
            error = error.split(":", 1)[0]
        return f"rule {rule.name}: when {when!r} could not be evaluated ({error})"
    return f"rule {rule.name}: when {when!r} is false"


def _ready(decl: LimitDecl, source: str, where: str, line: int | None) -> Limit:
    """The limiter's Limit for a declaration, made once at load (a bad one fails the load,
    never a check)."""
    try:
        return Limit(rate=decl.rate, period=decl.period, burst=decl.burst)
    except ValueError as exc:
        raise PolicyError(source, where, str(exc), line) from None


def _claim_key(value: object) -> object:
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value).__name__, value)
    return json.dumps(value, sort_keys=True, default=str)


def _dry_run(
    rule: CompiledRule, identity: Identity, version: str, allow_rule: str = ""
) -> Decision:
    return Decision(Outcome.ALLOW, Reason.DRY_RUN, f"dry-run rule {rule.name} would deny",
                    rule=rule.name, identity=identity, policy_version=version, dry_run=True,
                    allow_rule=allow_rule)


def compile_policy(documents: Iterable[PolicyDocument], version: str) -> CompiledPolicy:
    docs = tuple(documents)
    principals: dict[str, PrincipalDecl] = {}
    for doc in docs:
        for p in doc.principals:
            if p.name in principals and principals[p.name] != p:
                other = principals[p.name].source
                raise PolicyError(p.source, "principals",
                                  f"principal {p.name!r} is already declared in {other}", p.line)
            principals[p.name] = p
    rule_names: dict[str, str] = {}
    hosts: dict[str, HostTable] = {}
    compiled: list[CompiledRule] = []
    for doc in docs:
        for decl in doc.rules:
            if decl.name in rule_names:
                other = rule_names[decl.name]
                raise PolicyError(decl.source, "rules",
                                  f"rule name {decl.name!r} is already used in {other}", decl.line)
            rule_names[decl.name] = decl.source
            rule = compile_rule(decl, principals)
            compiled.append(rule)
            for host in decl.hosts:
                index(hosts.setdefault(host, HostTable()), rule)
    for table in hosts.values():
        finish(table)
    # Built (and so checked) at load: a bad connection rule never surfaces as a 503 per check.
    connections = compile_connections(docs, principals)
    return CompiledPolicy(version, hosts, principals, tuple(compiled), docs,
                          connections=connections)
