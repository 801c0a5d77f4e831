"""One compiled rule: its header matchers, RE2 path regex and resolved allow/deny lists.

What a rule contributes to a decision once the lookup tables (tables.py) found it on the
request's route: whether its `headers` and `when` filters apply, and whom it allows or denies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import re2

from extauthz.identity.spiffe import SpiffePattern
from extauthz.model import EMPTY, Identity
from extauthz.policy.conditions import TIME_GRANULARITY, Condition
from extauthz.policy.decls import (
    HeaderMatch,
    JwtMatch,
    LimitDecl,
    PathMatch,
    PrincipalDecl,
    RuleDecl,
)
from extauthz.policy.principals import PrincipalSet
from extauthz.policy.reader import PolicyError


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
