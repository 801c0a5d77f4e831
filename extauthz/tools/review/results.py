"""What a review produces: findings, rule changes, the report, and its settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("info", "low", "medium", "high", "critical")
RANK = {s: i for i, s in enumerate(SEVERITIES)}
# The decision-log field with a JWT's lifetime (exp - iat, seconds; null without both claims).
# Logs written before it existed lack it: then the lifetime check says it cannot run.
TOKEN_LIFETIME_FIELD = "token_lifetime_s"  # noqa: S105 - a field name
UNRECORDED = "(not recorded)"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: str
    kind: str
    subject: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def sort_key(self) -> tuple[int, str, str, str]:
        return (-RANK[self.severity], self.kind, self.subject, self.message)

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "kind": self.kind, "subject": self.subject,
                "message": self.message, "details": dict(self.details)}


@dataclass(frozen=True, slots=True)
class Split:
    """One narrowed rule replacing (part of) a wide one."""

    name: str
    path: str
    methods: tuple[str, ...]
    allow: tuple[str, ...]


@dataclass(slots=True)
class RuleChange:
    rule: str
    source: str
    remove_entries: list[str] = field(default_factory=list)
    methods: tuple[str, ...] | None = None
    splits: tuple[Split, ...] = ()
    remove_rule: bool = False


@dataclass(slots=True)
class Report:
    findings: list[Finding]
    summary: dict[str, Any]
    changes: dict[str, RuleChange]

    def at_least(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if RANK[f.severity] >= RANK[severity]]


@dataclass(frozen=True, slots=True)
class ReviewConfig:
    window_start: str = ""  # RFC 3339 UTC; records before it are skipped
    window_end: str = ""  # records at or after it are skipped
    max_token_lifetime: float | None = None  # seconds
    trust_domains: frozenset[str] = frozenset()  # expected; empty: those the policy names
    revoked_principals: frozenset[str] = frozenset()
    min_denials: int = 5
    burst_per_minute: int = 20
    min_rate_limited: int = 10
    max_principals: int = 10_000
    max_shapes_per_rule: int = 32
    max_denial_keys: int = 20_000
    max_split: int = 3
