"""The policy's declarations: what `parse_document` builds from a file, as plain data.

Immutable and free of behaviour, so every later stage (compiled tables, connection rules,
lint, review, inventory) reads the same values and none can change them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from extauthz.policy.conditions import Condition

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
VAR = re.compile(r"^\{([a-z_][a-z0-9_]{0,31})\}$")  # fixed: a `{name}` template segment



@dataclass(frozen=True, slots=True)
class LimitDecl:
    rate: int
    period: float
    burst: int


@dataclass(frozen=True, slots=True)
class JwtMatch:
    """A caller known by a JWT of `issuer`: its `sub` and/or claims (all must match)."""

    issuer: str
    subject: str = ""  # "" = any subject of the issuer (then claims are required)
    claims: tuple[tuple[str, str | int | bool], ...] = ()


@dataclass(frozen=True, slots=True)
class PrincipalDecl:
    name: str
    spiffe: str  # an exact SPIFFE ID or a SpiffePattern; "" when the principal is a `jwt`
    owner: str
    source: str
    limit: LimitDecl | None = None
    jwt: JwtMatch | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PathMatch:
    """`exact` / `prefix` (segment prefix), `template` / `template_prefix` (with `{name}`
    segments) or `regex` (RE2, matched against the whole normalized path)."""

    kind: str
    value: str

    @property
    def segments(self) -> tuple[str, ...]:
        """Template segments; a `{name}` segment is returned as "" (matches one segment)."""
        if self.value == "/":
            return ()
        return tuple("" if VAR.match(s) else s for s in self.value.split("/")[1:])


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lowercase
    kind: str  # "exact" | "present" | "absent" | "regex"
    value: str = ""


@dataclass(frozen=True, slots=True)
class RuleDecl:
    name: str
    hosts: tuple[str, ...]
    methods: frozenset[str]  # empty = any method
    path: PathMatch
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    mode: str  # "enforce" | "dry-run"
    limit: LimitDecl | None
    source: str
    owner: str
    headers: tuple[HeaderMatch, ...] = ()
    when: str = ""
    condition: Condition | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    source: str
    owner: str
    service: str
    hosts: tuple[str, ...]
    principals: tuple[PrincipalDecl, ...]
    rules: tuple[RuleDecl, ...]
    # Which principals may open TCP connections (Envoy's network ext_authz filter).
    connections: tuple[ConnectionRuleDecl, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionRuleDecl:
    """Who may open a TCP connection to `ports` (see policy/connections.py)."""

    name: str
    ports: frozenset[int]
    sni: frozenset[str]  # empty: any (or no) SNI
    allow: tuple[str, ...]
    source: str = ""
    line: int | None = field(default=None, compare=False)
