"""Policy compiled once into lookup tables; per request only dictionary lookups.

Layout: host -> (exact path -> method -> rules) and (prefix -> method -> rules). A request
path `/a/b/c` is looked up as an exact key and as the prefixes `/`, `/a`, `/a/b`, `/a/b/c`, so
the cost grows with the depth of the path, never with the number of rules.

Evaluation, in order (documented in docs/policy.md):
1. An enforce-mode rule that matches the route and denies the principal: 403 DENIED_BY_RULE.
2. Any matching rule that allows the principal: ALLOW (a dry-run deny that also matched marks
   the decision `dry_run`, reason DRY_RUN, so it is logged as "would deny").
3. A matching dry-run rule and no enforce rule: ALLOW, reason DRY_RUN ("would deny").
4. Matching rules, none allows: 403 PRINCIPAL_NOT_ALLOWED. No matching rule: 403 NO_MATCHING_RULE.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from extauthz.model import Decision, Identity, Outcome, Reason
from extauthz.policy import LimitDecl, PolicyDocument, PolicyError, PrincipalDecl, RuleDecl
from extauthz.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id

ANY_METHOD = "*"


@dataclass(frozen=True, slots=True)
class PrincipalSet:
    """Who a rule's allow or deny list names, resolved to SPIFFE IDs and patterns."""

    exact: frozenset[str] = frozenset()
    patterns: tuple[SpiffePattern, ...] = ()
    anyone: bool = False

    def __bool__(self) -> bool:
        return self.anyone or bool(self.exact) or bool(self.patterns)

    def contains(self, principal: str) -> bool:
        if self.anyone or principal in self.exact:
            return True
        if not self.patterns:
            return False
        try:
            sid = parse_spiffe_id(principal)
        except SpiffeIdError:
            return False
        return any(p.matches(sid) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    source: str
    owner: str
    dry_run: bool
    allow: PrincipalSet
    deny: PrincipalSet
    limit: LimitDecl | None
    decl: RuleDecl


@dataclass(slots=True)
class _HostTable:
    exact: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)
    prefix: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Match:
    decision: Decision
    considered: tuple[CompiledRule, ...]


class CompiledPolicy:
    def __init__(
        self,
        version: str,
        hosts: dict[str, _HostTable],
        principals: dict[str, PrincipalDecl],
        rules: tuple[CompiledRule, ...],
        documents: tuple[PolicyDocument, ...],
    ) -> None:
        self.version = version
        self._hosts = hosts
        self.principals = principals
        self.rules = rules
        self.documents = documents
        self._rule_limits = {r.name: r.limit for r in rules if r.limit is not None}
        self._exact_principals = {
            p.spiffe: p for p in principals.values() if SpiffePattern.parse(p.spiffe).is_exact
        }
        self._pattern_principals = [
            (SpiffePattern.parse(p.spiffe), p)
            for p in principals.values()
            if not SpiffePattern.parse(p.spiffe).is_exact
        ]

    def rule_limit(self, rule: str) -> LimitDecl | None:
        return self._rule_limits.get(rule)

    def declared_principal(self, principal: str) -> PrincipalDecl | None:
        """The declaration an identity belongs to (exact IDs first, then patterns)."""
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

    def candidates(self, host: str, method: str, path: str) -> list[CompiledRule]:
        """Rules whose host, method and path match: exact first, then longest prefix."""
        table = self._hosts.get(host)
        if table is None:
            return []
        found: list[CompiledRule] = []
        by_method = table.exact.get(path)
        if by_method is not None:
            found += by_method.get(method, ())
            found += by_method.get(ANY_METHOD, ())
        if table.prefix:
            prefixes = ["/"]
            start = 1
            while start <= len(path):
                slash = path.find("/", start)
                if slash < 0:
                    if start < len(path):
                        prefixes.append(path)
                    break
                prefixes.append(path[:slash])
                start = slash + 1
            for prefix in reversed(prefixes):
                by_method = table.prefix.get(prefix)
                if by_method is not None:
                    found += by_method.get(method, ())
                    found += by_method.get(ANY_METHOD, ())
        return found

    def evaluate(self, identity: Identity, host: str, method: str, path: str) -> Match:
        considered = tuple(self.candidates(host, method, path))
        principal = identity.principal
        version = self.version
        if not considered:
            return Match(
                Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE, "no rule matches this route",
                         identity=identity, policy_version=version),
                considered,
            )
        would_deny: CompiledRule | None = None
        for rule in considered:
            if rule.deny and rule.deny.contains(principal):
                if not rule.dry_run:
                    return Match(
                        Decision(Outcome.FORBIDDEN, Reason.DENIED_BY_RULE,
                                 f"denied by rule {rule.name}", rule=rule.name,
                                 identity=identity, policy_version=version),
                        considered,
                    )
                would_deny = would_deny or rule
        for rule in considered:
            if rule.allow and rule.allow.contains(principal):
                if would_deny is not None:
                    return Match(_dry_run(would_deny, identity, version), considered)
                return Match(
                    Decision(Outcome.ALLOW, Reason.ALLOWED, rule=rule.name, identity=identity,
                             policy_version=version),
                    considered,
                )
        enforced = [r for r in considered if not r.dry_run]
        if not enforced:
            return Match(_dry_run(considered[0], identity, version), considered)
        return Match(
            Decision(Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED,
                     "no rule for this route allows the caller", rule=enforced[0].name,
                     identity=identity, policy_version=version),
            considered,
        )


def _dry_run(rule: CompiledRule, identity: Identity, version: str) -> Decision:
    return Decision(Outcome.ALLOW, Reason.DRY_RUN, f"dry-run rule {rule.name} would deny",
                    rule=rule.name, identity=identity, policy_version=version, dry_run=True)


def compile_policy(documents: Iterable[PolicyDocument], version: str) -> CompiledPolicy:
    docs = tuple(documents)
    principals: dict[str, PrincipalDecl] = {}
    for doc in docs:
        for p in doc.principals:
            if p.name in principals and principals[p.name] != p:
                other = principals[p.name].source
                raise PolicyError(p.source, "principals", f"principal {p.name!r} is already declared in {other}")
            principals[p.name] = p
    rule_names: dict[str, str] = {}
    hosts: dict[str, _HostTable] = {}
    compiled: list[CompiledRule] = []
    for doc in docs:
        for decl in doc.rules:
            if decl.name in rule_names:
                raise PolicyError(decl.source, "rules", f"rule name {decl.name!r} is already used in {rule_names[decl.name]}")
            rule_names[decl.name] = decl.source
            rule = CompiledRule(
                name=decl.name,
                source=decl.source,
                owner=decl.owner,
                dry_run=decl.mode == "dry-run",
                allow=_principal_set(decl, decl.allow, principals, "allow"),
                deny=_principal_set(decl, decl.deny, principals, "deny"),
                limit=decl.limit,
                decl=decl,
            )
            compiled.append(rule)
            methods = decl.methods or {ANY_METHOD}
            for host in decl.hosts:
                table = hosts.setdefault(host, _HostTable())
                index = table.exact if decl.path.kind == "exact" else table.prefix
                by_method = index.setdefault(decl.path.value, {})
                for method in methods:
                    by_method.setdefault(method, []).append(rule)
    return CompiledPolicy(version, hosts, principals, tuple(compiled), docs)


def _principal_set(
    decl: RuleDecl, entries: tuple[str, ...], principals: dict[str, PrincipalDecl], key: str
) -> PrincipalSet:
    exact: set[str] = set()
    patterns: list[SpiffePattern] = []
    anyone = False
    for entry in entries:
        if entry == "*":
            anyone = True
            continue
        if entry.startswith("spiffe://"):
            value = entry
        else:
            declared = principals.get(entry)
            if declared is None:
                raise PolicyError(decl.source, f"rules[{decl.name}].{key}", f"unknown principal {entry!r}")
            value = declared.spiffe
        pattern = SpiffePattern.parse(value)
        if pattern.is_exact:
            exact.add(value)
        else:
            patterns.append(pattern)
    return PrincipalSet(frozenset(exact), tuple(patterns), anyone)
