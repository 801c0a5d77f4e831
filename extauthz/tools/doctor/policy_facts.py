"""The few facts about an extauthz policy that the doctor cross-checks against Envoy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from extauthz.policy.document import PathMatch

if TYPE_CHECKING:
    from extauthz.policy.compiled import CompiledPolicy


@dataclass(frozen=True, slots=True)
class RuleFacts:
    name: str
    hosts: tuple[str, ...]
    path: PathMatch
    where: str  # file:line, for the reader to jump to

    def describe(self) -> str:
        return f"{self.name} ({self.where})"


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """The hosts; whether any rule matches on a path narrower than prefix `/` (only then do
    path-normalization settings matter); and each rule's hosts and path, to name the rules an
    exempt route shadows."""

    hosts: tuple[str, ...]
    matches_on_path: bool
    rules: tuple[RuleFacts, ...] = ()

    @classmethod
    def from_policy(cls, policy: CompiledPolicy) -> PolicyFacts:
        hosts: set[str] = set()
        for doc in policy.documents:
            hosts.update(h.lower() for h in doc.hosts)
        on_path = False
        rules: list[RuleFacts] = []
        for rule in policy.rules:
            decl = rule.decl
            if not (decl.path.kind == "prefix" and decl.path.value == "/"):
                on_path = True
            where = f"{decl.source}:{decl.line}" if decl.line is not None else decl.source
            rules.append(RuleFacts(decl.name, tuple(h.lower() for h in decl.hosts), decl.path,
                                   where))
        return cls(tuple(sorted(hosts)), on_path, tuple(rules))
