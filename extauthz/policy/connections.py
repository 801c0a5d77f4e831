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

Pure core: no I/O, no gRPC, no Envoy types.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern
from extauthz.model import Decision, Identity, Outcome, Reason
from extauthz.policy.principals import PrincipalSet

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
_RULE_FIELDS = frozenset({"name", "ports", "sni", "allow"})
# The context keys proto.to_request fills for a network check (from Envoy's attributes).
DESTINATION_PORT = "destination_port"
DESTINATION_ADDRESS = "destination_address"


class ConnectionPolicyError(ValueError):
    """A bad `connections:` entry; `field` is the path inside the document."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, slots=True)
class ConnectionRuleDecl:
    name: str
    ports: frozenset[int]
    sni: frozenset[str]  # empty: any (or no) SNI
    allow: tuple[str, ...]


def parse_connections(raw: object) -> tuple[ConnectionRuleDecl, ...]:
    """Validate a document's `connections:` value (None: no rules)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConnectionPolicyError("connections", "must be a list")
    rules = []
    for i, item in enumerate(raw):
        where = f"connections[{i}]"
        if not isinstance(item, Mapping):
            raise ConnectionPolicyError(where, "must be a mapping")
        unknown = sorted(str(k) for k in item if k not in _RULE_FIELDS)
        if unknown:
            allowed = ", ".join(sorted(_RULE_FIELDS))
            raise ConnectionPolicyError(
                f"{where}.{unknown[0]}", f"unknown field (allowed: {allowed})"
            )
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConnectionPolicyError(
                f"{where}.name", "is required: lowercase letters, digits, '.', '_' or '-'"
            )
        ports = item.get("ports")
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = [ports]
        if not isinstance(ports, list) or not ports or not all(_port(p) for p in ports):
            raise ConnectionPolicyError(f"{where}.ports", "must be a list of ports (1-65535)")
        sni = _strings(item.get("sni"), f"{where}.sni")
        allow = _strings(item.get("allow"), f"{where}.allow")
        if not allow:
            raise ConnectionPolicyError(f"{where}.allow", "is required (default is deny)")
        for entry in allow:
            if entry.startswith("spiffe://"):
                try:
                    SpiffePattern.parse(entry)
                except SpiffeIdError as exc:
                    raise ConnectionPolicyError(
                        f"{where}.allow", f"invalid SPIFFE ID or pattern {entry!r}: {exc}"
                    ) from None
            elif entry != "*" and not _NAME.match(entry):
                raise ConnectionPolicyError(
                    f"{where}.allow", f"{entry!r} is neither a principal name nor a SPIFFE ID"
                )
        rules.append(
            ConnectionRuleDecl(name, frozenset(ports), frozenset(s.lower() for s in sni), allow)
        )
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise ConnectionPolicyError("connections", f"rule name {name!r} is used twice")
    return tuple(rules)


def _port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConnectionPolicyError(where, "must be a list of non-empty strings")
    return tuple(value)


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
    rules: Iterable[ConnectionRuleDecl], principals: Mapping[str, str]
) -> ConnectionTable:
    """Compile rules; `principals` maps declared principal names to SPIFFE IDs/patterns.

    Raises ConnectionPolicyError for a name no document declares (with a SPIFFE ID), or a rule
    name used twice across documents.
    """
    compiled = []
    seen: set[str] = set()
    for decl in rules:
        if decl.name in seen:
            raise ConnectionPolicyError("connections", f"rule name {decl.name!r} is used twice")
        seen.add(decl.name)
        exact: set[str] = set()
        patterns: list[SpiffePattern] = []
        anyone = False
        for entry in decl.allow:
            if entry == "*":
                anyone = True
                continue
            value = entry if entry.startswith("spiffe://") else principals.get(entry, "")
            if not value:
                raise ConnectionPolicyError(
                    f"connections[{decl.name}].allow",
                    f"unknown principal {entry!r} (or one without a SPIFFE ID)",
                )
            pattern = SpiffePattern.parse(value)
            if pattern.is_exact:
                exact.add(value)
            else:
                patterns.append(pattern)
        compiled.append(_Rule(decl, PrincipalSet(frozenset(exact), tuple(patterns), anyone)))
    return ConnectionTable(compiled)


def connection_rules(documents: Iterable[object]) -> list[ConnectionRuleDecl]:
    """The connection rules of parsed policy documents (their `connections` attribute)."""
    out: list[ConnectionRuleDecl] = []
    for doc in documents:
        out.extend(getattr(doc, "connections", ()) or ())
    return out


def principal_ids(principals: Mapping[str, object]) -> dict[str, str]:
    """Declared principal name -> SPIFFE ID or pattern (principals without one are left out)."""
    out = {}
    for name, decl in principals.items():
        spiffe = getattr(decl, "spiffe", "")
        if isinstance(spiffe, str) and spiffe:
            out[name] = spiffe
    return out


def destination_port(context: Mapping[str, str]) -> int:
    raw = context.get(DESTINATION_PORT, "")
    return int(raw) if raw.isdigit() else 0
