"""Who may open a connection to a TCP service: the policy for Envoy's network ext_authz filter.

A network (L4) check carries no HTTP attributes: only the caller's verified identity, the
address and port the connection arrived on (the Envoy listener's), and the TLS SNI the caller
asked for. Policy files say which principals may connect with an additive top-level key:

    connections:
      - name: orders-db-clients
        ports: [5432]              # the Envoy listener's port (destination port)
        sni: [orders-db.mesh]      # optional: only connections that asked for this name
        allow: [checkout, spiffe://prod.example/ns/batch/sa/*]

Evaluation, in order: rules whose ports contain the destination port and whose `sni` (when
given) contains the requested server name are candidates; the first candidate that allows the
principal allows the connection (reason `allowed`, rule = its name). Candidates that do not
allow it: 403 `principal_not_allowed`; no candidate: 403 `no_matching_rule`. Default deny, as
for HTTP. Connections are not rate limited and not cached (the check is a set lookup).

The `connections:` entries are parsed with the rest of the document (document.py: the same
reader, name syntax, caller check and `file: field (line N)` errors); this module compiles
them into the table the compiled policy holds, built once per policy version.

Pure core: no I/O, no gRPC, no Envoy types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from extauthz.identity.spiffe import SpiffePattern
from extauthz.model import Decision, Identity, Outcome, Reason
from extauthz.policy.decls import ConnectionRuleDecl, PolicyDocument, PrincipalDecl
from extauthz.policy.principals import PrincipalSet
from extauthz.policy.reader import PolicyError


@dataclass(frozen=True, slots=True)
class _Rule:
    decl: ConnectionRuleDecl
    callers: PrincipalSet

    def allows(self, principal: str) -> bool:
        return self.callers.contains(principal)

class ConnectionTable:
    """Connection rules compiled by port; per check a dict lookup and a set test."""

    def __init__(self, rules: Iterable[_Rule] = ()) -> None:
        self._by_port: dict[int, list[_Rule]] = {}
        for rule in rules:
            for port in sorted(rule.decl.ports):
                self._by_port.setdefault(port, []).append(rule)

    def __bool__(self) -> bool:
        return bool(self._by_port)

    def evaluate(self, identity: Identity, port: int, sni: str, version: str) -> Decision:
        sni = sni.lower()
        candidates = [r for r in self._by_port.get(port, ()) if not r.decl.sni or sni in r.decl.sni]
        if not candidates:
            return Decision(
                Outcome.FORBIDDEN,
                Reason.NO_MATCHING_RULE,
                f"no connection rule for port {port}" + (f" and SNI {sni}" if sni else ""),
                identity=identity,
                policy_version=version,
            )
        for rule in candidates:
            if rule.allows(identity.principal):
                return Decision(
                    Outcome.ALLOW,
                    Reason.ALLOWED,
                    rule=rule.decl.name,
                    identity=identity,
                    policy_version=version,
                )
        return Decision(
            Outcome.FORBIDDEN,
            Reason.PRINCIPAL_NOT_ALLOWED,
            "no connection rule for this port allows the caller",
            rule=candidates[0].decl.name,
            identity=identity,
            policy_version=version,
        )


def compile_connections(
    documents: Iterable[PolicyDocument], principals: Mapping[str, PrincipalDecl]
) -> ConnectionTable:
    """The connection rules of all documents, by port. `principals` are the declarations of
    every document (a rule may name a principal another team declared).

    Raises PolicyError, naming the rule's own file and line, for a name no document declares
    with a SPIFFE ID, or a rule name already used in another document.
    """
    compiled = []
    seen: dict[str, ConnectionRuleDecl] = {}
    for doc in documents:
        for decl in doc.connections:
            other = seen.get(decl.name)
            if other is not None:
                raise PolicyError(decl.source, "connections",
                                  f"rule name {decl.name!r} is already used in {other.source}",
                                  decl.line)
            seen[decl.name] = decl
            compiled.append(_Rule(decl, _callers(decl, principals)))
    return ConnectionTable(compiled)


def _callers(decl: ConnectionRuleDecl, principals: Mapping[str, PrincipalDecl]) -> PrincipalSet:
    exact: set[str] = set()
    patterns: list[SpiffePattern] = []
    anyone = False
    for entry in decl.allow:
        if entry == "*":
            anyone = True
            continue
        if entry.startswith("spiffe://"):
            value = entry
        else:
            declared = principals.get(entry)
            value = declared.spiffe if declared is not None else ""
        if not value:
            raise PolicyError(decl.source, f"connections[{decl.name}].allow",
                              f"unknown principal {entry!r} (or one without a SPIFFE ID)",
                              decl.line)
        pattern = SpiffePattern.parse(value)
        if pattern.is_exact:
            exact.add(value)
        else:
            patterns.append(pattern)
    return PrincipalSet(frozenset(exact), tuple(patterns), anyone)
