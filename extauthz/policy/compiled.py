"""Policy compiled once into lookup tables; per request only lookups, never a scan of rules.

Per host (lowercase, no port):
* exact paths:        dict  path -> method -> rules
* segment prefixes:   dict  prefix -> method -> rules; `/a/b/c` looks up `/`, `/a`, `/a/b`,
                      `/a/b/c`
* templates:          a segment trie (`{name}` = a wildcard child matching one non-empty
                      segment), walked once along the path
* RE2 regexes:        bucketed by their literal leading segments (`^/v1/orders/[0-9]+$` lives
                      under `/v1/orders/`); only buckets on the request path are tried
So the cost grows with the depth of the path and the rules *on that route*, never with the
number of rules in the policy (bench/policy_scale.py measures it).

Evaluation, in order (documented in docs/policy.md):
0. A method-override header (`x-http-method-override`, `x-method-override`, `x-http-method`)
   whose value differs from the request method: 403 METHOD_OVERRIDE. Overrides never change
   the method a rule sees.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import re2

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.model import EMPTY, Decision, Identity, IdentitySource, Outcome, Reason
from extauthz.policy.conditions import TIME_GRANULARITY, Condition
from extauthz.policy.connections import (
    ConnectionPolicyError,
    compile_connections,
    connection_rules,
    principal_ids,
)
from extauthz.policy.document import (
    HeaderMatch,
    JwtMatch,
    LimitDecl,
    PathMatch,
    PolicyDocument,
    PolicyError,
    PrincipalDecl,
    RuleDecl,
)
from extauthz.policy.paths import without_params
from extauthz.policy.principals import PrincipalSet, jwt_matches

ANY_METHOD = "*"
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")
_REGEX_META = frozenset("\\.^$*+?()[]{}|")
_REGEX_QUANTIFIERS = frozenset("?*+{")


@dataclass(frozen=True, slots=True)
class CompiledHeader:
    decl: HeaderMatch
    regex: Any = None  # re2 pattern for kind "regex"

    def matches(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.decl.name)
        kind = self.decl.kind
        if kind == "present":
            return value is not None
        if kind == "absent":
            return value is None
        if value is None:
            return False
        if kind == "exact":
            return value == self.decl.value
        return self.regex.fullmatch(value) is not None


@dataclass(slots=True)
class RequestInputs:
    """What `headers` and `when` may read; CEL variables are built only when needed."""

    identity: Identity
    host: str
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    now: float = 0.0

    def variables(self, cond: Condition) -> dict[str, object]:
        ident = self.identity
        out: dict[str, object] = {
            "request": {"method": self.method, "host": self.host, "path": self.path},
            "headers": {h: self.headers[h] for h in cond.headers if h in self.headers},
            "claims": {c: ident.claims[c] for c in cond.claims if c in ident.claims},
            "principal": ident.principal,
            "issuer": ident.issuer,
            "source": str(ident.source),
        }
        if cond.uses_time:
            minute = int(self.now // TIME_GRANULARITY) * TIME_GRANULARITY
            out["now"] = datetime.fromtimestamp(minute, UTC)
        return out


@dataclass(frozen=True, slots=True)
class FilterResult:
    """How a route-matching rule's `headers` and `when` came out for one request."""

    failed_header: HeaderMatch | None = None
    condition: bool | str | None = None  # None: no condition; str: evaluation error

    @property
    def applies_to_allow(self) -> bool:
        return self.failed_header is None and self.condition in (None, True)

    @property
    def applies_to_deny(self) -> bool:
        return self.failed_header is None and self.condition is not False


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
    headers: tuple[CompiledHeader, ...] = ()
    regex: Any = None  # re2 pattern for path_regex rules

    @property
    def filtered(self) -> bool:
        return bool(self.headers) or self.decl.condition is not None

    def method_matches(self, method: str) -> bool:
        return not self.decl.methods or method in self.decl.methods

    def path_matches(self, path: str) -> bool:
        """The rule's path on its own (the reference the lookup tables are tested against)."""
        return path_matches(self.decl.path, path, self.regex)

    def applies(self, result: FilterResult) -> tuple[bool, bool]:
        """Whether the rule's allow list and its deny list take part, given its filters."""
        return (result.applies_to_allow and bool(self.allow),
                result.applies_to_deny and bool(self.deny))

    def filters(self, inputs: RequestInputs) -> FilterResult:
        for header in self.headers:
            if not header.matches(inputs.headers):
                return FilterResult(failed_header=header.decl)
        cond = self.decl.condition
        if cond is None:
            return FilterResult()
        return FilterResult(condition=cond.evaluate(inputs.variables(cond)))


def path_matches(match: PathMatch, path: str, regex: Any = None) -> bool:
    kind = match.kind
    if kind == "exact":
        return path == match.value
    if kind == "prefix":
        v = match.value
        return v in ("/", path) or path.startswith(v + "/")
    if kind == "regex":
        return (regex or re2.compile(match.value)).fullmatch(path) is not None
    want = match.segments
    got = path.split("/")[1:]
    if len(got) < len(want) or (kind == "template" and len(got) != len(want)):
        return False
    return all((w == g) if w else bool(g) for w, g in zip(want, got, strict=False))


def regex_bucket(pattern: str) -> str:
    """The literal leading segments every match of `pattern` starts with ("" if unknown).

    `^/v1/orders/[0-9]+$` -> `/v1/orders/`. Conservative: any alternation, escape or
    quantifier on the last literal character shortens the prefix.
    """
    if "|" in pattern:
        return ""
    body = pattern[1:] if pattern.startswith("^") else pattern
    end = 0
    while end < len(body) and body[end] not in _REGEX_META:
        end += 1
    run = body[:end]
    if end < len(body) and body[end] in _REGEX_QUANTIFIERS:
        run = run[:-1]
    if not run.startswith("/"):
        return ""
    return run[: run.rfind("/") + 1]


@dataclass(slots=True)
class _Node:
    lit: dict[str, _Node] = field(default_factory=dict)
    var: _Node | None = None
    exact: dict[str, list[CompiledRule]] = field(default_factory=dict)
    prefix: dict[str, list[CompiledRule]] = field(default_factory=dict)


@dataclass(slots=True)
class _HostTable:
    exact: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)
    prefix: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)
    trie: _Node | None = None
    regex: dict[str, list[CompiledRule]] = field(default_factory=dict)
    rules: list[CompiledRule] = field(default_factory=list)
    header_names: tuple[str, ...] = ()
    claim_names: tuple[str, ...] = ()
    uses_time: bool = False
    filtered: bool = False


def _by_method(index: dict[str, list[CompiledRule]], method: str) -> list[CompiledRule]:
    a = index.get(method)
    b = index.get(ANY_METHOD)
    if a is None:
        return b or []
    return a + b if b else a


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
        the method-override headers, the issuer, and the values of every header and claim
        any rule of this host reads (plus the minute, if a condition reads the time)."""
        part: list[object] = [identity.issuer]
        if headers:
            part += [headers.get(h) for h in METHOD_OVERRIDE_HEADERS]
        table = self._hosts.get(host)
        if table is None or not table.filtered:
            return tuple(part)
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
        if table is None:
            return []
        found: list[CompiledRule] = []
        by_method = table.exact.get(path)
        if by_method is not None:
            found += _by_method(by_method, method)
        prefixed: list[tuple[int, list[CompiledRule]]] = []
        templated: list[tuple[int, list[CompiledRule]]] = []
        if table.trie is not None:
            self._walk(table.trie, path, method, found, templated)
        if table.regex:
            self._regexes(table.regex, path, method, found)
        if table.prefix:
            rules = table.prefix.get("/")
            if rules is not None:
                prefixed.append((0, _by_method(rules, method)))
            depth, start = 0, 1
            while start < len(path):
                slash = path.find("/", start)
                end = len(path) if slash < 0 else slash
                depth += 1
                rules = table.prefix.get(path[:end])
                if rules is not None:
                    prefixed.append((depth, _by_method(rules, method)))
                if slash < 0:
                    break
                start = slash + 1
        if templated:
            prefixed += templated
        if prefixed:
            prefixed.sort(key=lambda item: -item[0])  # stable: literal before template
            for _, rules_at in prefixed:
                found += rules_at
        return found

    @staticmethod
    def _walk(root: _Node, path: str, method: str, found: list[CompiledRule],
              prefixed: list[tuple[int, list[CompiledRule]]]) -> None:
        segs = path.split("/")[1:]
        stack = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if node.prefix and i > 0:
                prefixed.append((i, _by_method(node.prefix, method)))
            if i == len(segs):
                if node.exact:
                    found += _by_method(node.exact, method)
                continue
            seg = segs[i]
            if node.var is not None and seg:
                stack.append((node.var, i + 1))
            child = node.lit.get(seg)
            if child is not None:
                stack.append((child, i + 1))

    @staticmethod
    def _regexes(buckets: dict[str, list[CompiledRule]], path: str, method: str,
                 found: list[CompiledRule]) -> None:
        keys = [""]
        slash = path.find("/")
        while slash >= 0:
            keys.append(path[: slash + 1])
            slash = path.find("/", slash + 1)
        for key in keys:
            for rule in buckets.get(key, ()):
                if rule.method_matches(method) and rule.regex.fullmatch(path) is not None:
                    found.append(rule)

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
        """Decide one request whose host and path are already normalized.

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
        version = self.version
        override = method_override_violation(method, headers)
        if override:
            return Match(Decision(Outcome.FORBIDDEN, Reason.METHOD_OVERRIDE, override,
                                  identity=identity, policy_version=version), ())
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
            return Match(_unmet(unmet, headers, identity, version), considered)
        if not applied:
            detail = ("rules for this route do not match its headers or conditions" if route
                      else "no rule matches this route")
            return Match(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE, detail,
                                  identity=identity, policy_version=version), considered)
        would_deny: CompiledRule | None = None
        for rule, _, denies in applied:
            if denies and rule.deny and rule.deny.contains(identity):
                if not rule.dry_run:
                    return Match(
                        Decision(Outcome.FORBIDDEN, Reason.DENIED_BY_RULE,
                                 f"denied by rule {rule.name}", rule=rule.name,
                                 identity=identity, policy_version=version),
                        considered,
                    )
                would_deny = would_deny or rule
        for rule, allows, _ in applied:
            if allows and rule.allow and rule.allow.contains(identity):
                if would_deny is not None:
                    return Match(
                        _dry_run(would_deny, identity, version, allow_rule=rule.name),
                        considered,
                    )
                return Match(
                    Decision(Outcome.ALLOW, Reason.ALLOWED, rule=rule.name, identity=identity,
                             policy_version=version),
                    considered,
                )
        enforced = [r for r in considered if not r.dry_run]
        if not enforced:
            return Match(_dry_run(considered[0], identity, version), considered)
        if unmet is not None:  # a rule would allow the caller, but for its condition
            return Match(_unmet(unmet, headers, identity, version), considered)
        return Match(
            Decision(Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED,
                     "no rule for this route allows the caller", rule=enforced[0].name,
                     identity=identity, policy_version=version),
            considered,
        )


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


def method_override_violation(method: str, headers: Mapping[str, str]) -> str:
    """A reason to deny when an override header names another method ("" when none)."""
    if not headers:
        return ""
    for name in METHOD_OVERRIDE_HEADERS:
        value = headers.get(name)
        if value is not None and value.strip().upper() != method:
            return (f"{name}: {value[:32]!r} differs from the request method {method}; "
                    "method overrides are not honoured")
    return ""


METHOD_OVERRIDE_PARAMS = ("_method",)


def query_method_override(method: str, raw_path: str) -> str:
    """A reason to deny when a `_method` query parameter names another method ("" if none).

    Symfony/Laravel (with method-parameter override on) and Express's `method-override`
    read `?_method=DELETE` on a POST. The query is not part of the path rules match, and not
    of the decision cache key, so this runs on the raw `:path` before both."""
    head = raw_path.split("#", 1)[0]
    q = head.find("?")
    if q < 0:
        return ""
    query = head[q + 1 :]
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if _unquote(name).strip().lower() in METHOD_OVERRIDE_PARAMS:
            wanted = _unquote(value).strip().upper()
            if wanted != method:
                return (f"query parameter {name[:16]!r}={wanted[:32]!r} differs from the request "
                        f"method {method}; method overrides are not honoured")
    return ""


def _unquote(text: str) -> str:
    """Form-style decoding (`+` and `%XX`) of one query component; bad escapes stay."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if (text[i] == "%" and i + 2 < len(text)
                and all(c in "0123456789abcdefABCDEF" for c in text[i + 1 : i + 3])):
            out.append(chr(int(text[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


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
    hosts: dict[str, _HostTable] = {}
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
                _index(hosts.setdefault(host, _HostTable()), rule)
    for table in hosts.values():
        _finish(table)
    try:  # checked at load so a bad connection rule never surfaces as a 503 per check
        compile_connections(connection_rules(docs), principal_ids(principals))
    except ConnectionPolicyError as exc:
        source = next((d.source for d in docs if d.connections), "policy")
        raise PolicyError(source, exc.field, exc.message) from None
    return CompiledPolicy(version, hosts, principals, tuple(compiled), docs)


def compile_rule(decl: RuleDecl, principals: Mapping[str, PrincipalDecl]) -> CompiledRule:
    return CompiledRule(
        name=decl.name,
        source=decl.source,
        owner=decl.owner,
        dry_run=decl.mode == "dry-run",
        allow=_principal_set(decl, decl.allow, principals, "allow"),
        deny=_principal_set(decl, decl.deny, principals, "deny"),
        limit=decl.limit,
        decl=decl,
        headers=tuple(
            CompiledHeader(h, re2.compile(h.value) if h.kind == "regex" else None)
            for h in decl.headers
        ),
        regex=re2.compile(decl.path.value) if decl.path.kind == "regex" else None,
    )


def _index(table: _HostTable, rule: CompiledRule) -> None:
    table.rules.append(rule)
    decl = rule.decl
    methods = decl.methods or {ANY_METHOD}
    kind = decl.path.kind
    if kind == "regex":
        table.regex.setdefault(regex_bucket(decl.path.value), []).append(rule)
        return
    if kind in ("exact", "prefix"):
        by_method = (table.exact if kind == "exact" else table.prefix).setdefault(
            decl.path.value, {})
    else:
        node = table.trie = table.trie or _Node()
        for seg in decl.path.segments:
            if seg:
                node = node.lit.setdefault(seg, _Node())
            else:
                node.var = node.var or _Node()
                node = node.var
        by_method = node.exact if kind == "template" else node.prefix
    for method in methods:
        by_method.setdefault(method, []).append(rule)


def _finish(table: _HostTable) -> None:
    names: set[str] = set()
    claims: set[str] = set()
    for rule in table.rules:
        names.update(h.decl.name for h in rule.headers)
        cond = rule.decl.condition
        if cond is not None:
            names.update(cond.headers)
            claims.update(cond.claims)
            table.uses_time = table.uses_time or cond.uses_time
        for who in (rule.allow, rule.deny):
            for m in who.jwt:
                claims.update(name for name, _ in m.claims)
    table.header_names = tuple(sorted(names - set(METHOD_OVERRIDE_HEADERS)))
    table.claim_names = tuple(sorted(claims))
    table.filtered = bool(table.header_names or table.claim_names or table.uses_time)


def _principal_set(
    decl: RuleDecl, entries: tuple[str, ...], principals: Mapping[str, PrincipalDecl], key: str
) -> PrincipalSet:
    exact: set[str] = set()
    patterns: list[SpiffePattern] = []
    jwts: list[JwtMatch] = []
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
                raise PolicyError(decl.source, f"rules[{decl.name}].{key}",
                                  f"unknown principal {entry!r}", decl.line)
            if declared.jwt is not None:
                jwts.append(declared.jwt)
                continue
            value = declared.spiffe
        pattern = SpiffePattern.parse(value)
        if pattern.is_exact:
            exact.add(value)
        else:
            patterns.append(pattern)
    return PrincipalSet(frozenset(exact), tuple(patterns), anyone, tuple(jwts))
