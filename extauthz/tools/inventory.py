"""The inventory: every declared calling workload, who owns it, what it may call, and (given
decision logs) whether it calls at all.

Pure: a compiled policy and decision-log records in, rows out (`InventoryBuilder.feed` one
record at a time; memory is bounded by the declarations plus `max_undeclared`). Records are
attributed to a declaration by identity (`CompiledPolicy.declared_principal`), whatever policy
version decided them.

Flags:
* `no-owner`: the declaration names no owner; `owner-inherited`: it names none of its own and
  takes the owner of the policy file that declares it (the calling team is not recorded).
* `no-grants`: no rule allows it. `never-seen`: no decision for it in the logs.
* undeclared principals (seen in the logs, declared nowhere) are listed apart.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.identity.spiffe import SpiffePattern, parse_spiffe_id
from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import PrincipalDecl
from extauthz.tools.review import describe_route, identity_of

_CACHE = 100_000


@dataclass(slots=True)
class Activity:
    allowed: int = 0
    denied: int = 0
    first_seen: str = ""
    last_seen: str = ""

    def add(self, t: str, allowed: bool) -> None:
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1
        if not self.first_seen or t < self.first_seen:
            self.first_seen = t
        self.last_seen = max(self.last_seen, t)


@dataclass(frozen=True, slots=True)
class PrincipalRow:
    name: str
    owner: str
    identity: str
    declared_in: str
    grants: tuple[str, ...]  # "rule: route"
    any_caller: tuple[str, ...]  # rules that allow everyone (`*`)
    activity: Activity | None
    flags: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        a = self.activity
        return {"name": self.name, "owner": self.owner or None, "identity": self.identity,
                "declared_in": self.declared_in, "grants": list(self.grants),
                "any_caller_rules": list(self.any_caller), "flags": list(self.flags),
                "allowed": a.allowed if a else None, "denied": a.denied if a else None,
                "first_seen": (a.first_seen or None) if a else None,
                "last_seen": (a.last_seen or None) if a else None}


@dataclass(frozen=True, slots=True)
class Inventory:
    policy_version: str
    principals: tuple[PrincipalRow, ...]
    undeclared: tuple[tuple[str, Activity], ...]
    undeclared_overflow: int
    unauthenticated: int
    with_logs: bool

    def flagged(self) -> int:
        return sum(1 for p in self.principals if p.flags) + len(self.undeclared)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version,
            "principals": [p.as_dict() for p in self.principals],
            "undeclared": [{"principal": p, "allowed": a.allowed, "denied": a.denied,
                            "first_seen": a.first_seen, "last_seen": a.last_seen}
                           for p, a in self.undeclared] if self.with_logs else None,
            "undeclared_overflow": self.undeclared_overflow,
            "unauthenticated": self.unauthenticated if self.with_logs else None,
        }


def identity_text(p: PrincipalDecl) -> str:
    if p.jwt is not None:
        claims = ", ".join(f"{k}={v}" for k, v in p.jwt.claims)
        text = f"jwt iss={p.jwt.issuer}"
        if p.jwt.subject:
            text += f" sub={p.jwt.subject}"
        return f"{text} {claims}".rstrip() if claims else text
    kind = "" if SpiffePattern.parse(p.spiffe).is_exact else " (pattern)"
    return p.spiffe + kind


def _names(entry: str, p: PrincipalDecl) -> bool:
    """Whether an allow entry grants declaration `p` (by name or by its SPIFFE ID)."""
    if entry == p.name:
        return True
    if not entry.startswith("spiffe://") or not p.spiffe:
        return False
    if entry == p.spiffe:
        return True
    pattern = SpiffePattern.parse(entry)
    if pattern.is_exact or not SpiffePattern.parse(p.spiffe).is_exact:
        return False
    return pattern.matches(parse_spiffe_id(p.spiffe))


@dataclass
class InventoryBuilder:
    policy: CompiledPolicy
    explicit_owners: frozenset[str] | None = None  # names declaring `owner:`; None: unknown
    max_undeclared: int = 10_000
    activity: dict[str, Activity] = field(default_factory=dict)
    undeclared: dict[str, Activity] = field(default_factory=dict)
    undeclared_overflow: int = 0
    unauthenticated: int = 0
    records: int = 0
    _who: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def feed_all(self, records: Iterable[Mapping[str, Any]]) -> InventoryBuilder:
        for rec in records:
            self.feed(rec)
        return self

    def feed(self, rec: Mapping[str, Any]) -> None:
        t = rec.get("time")
        if not isinstance(t, str):
            return
        self.records += 1
        ident = identity_of(rec)
        if ident is None:
            self.unauthenticated += 1
            return
        key = (ident.principal, ident.issuer, ident.source.value)
        name = self._who.get(key)
        if name is None:
            decl = self.policy.declared_principal(ident)
            name = decl.name if decl is not None else ""
            if len(self._who) >= _CACHE:
                self._who.clear()
            self._who[key] = name
        allowed = rec.get("decision") == "allow"
        if name:
            self.activity.setdefault(name, Activity()).add(t, allowed)
            return
        seen = self.undeclared.get(ident.principal)
        if seen is None:
            if len(self.undeclared) >= self.max_undeclared:
                self.undeclared_overflow += 1
                return
            seen = self.undeclared[ident.principal] = Activity()
        seen.add(t, allowed)

    def result(self, with_logs: bool = True) -> Inventory:
        policy = self.policy
        doc_owner = {d.source: d.owner for d in policy.documents}
        rows = []
        for name, p in sorted(policy.principals.items()):
            grants, anyone = [], []
            for rule in policy.rules:
                entries = rule.decl.allow
                if any(_names(e, p) for e in entries):
                    grants.append(f"{rule.name}: {describe_route(rule)}")
                elif "*" in entries:
                    anyone.append(rule.name)
            flags = []
            if not p.owner:
                flags.append("no-owner")
            elif self.explicit_owners is not None and name not in self.explicit_owners:
                flags.append("owner-inherited")
            if not grants:
                flags.append("no-grants")
            act = self.activity.get(name) if with_logs else None
            if with_logs and act is None:
                act = Activity()
                flags.append("never-seen")
            rows.append(PrincipalRow(
                name, p.owner if p.owner != "" else "", identity_text(p),
                p.source + (f" (owner of file: {doc_owner.get(p.source, '?')})"
                            if "owner-inherited" in flags else ""),
                tuple(sorted(grants)), tuple(sorted(anyone)), act, tuple(flags)))
        undeclared = tuple(sorted(self.undeclared.items())) if with_logs else ()
        return Inventory(policy.version, tuple(rows), undeclared, self.undeclared_overflow,
                         self.unauthenticated, with_logs)


# --- output ----------------------------------------------------------------------------------


def _cells(row: PrincipalRow, with_logs: bool) -> list[str]:
    grants = "; ".join(g.split(":", 1)[0] for g in row.grants) or "-"
    if row.any_caller:
        grants += f" (+ any caller: {', '.join(row.any_caller)})"
    out = [row.name, row.owner or "-", row.identity, grants]
    if with_logs:
        a = row.activity or Activity()
        out += [str(a.allowed), str(a.denied), a.first_seen or "-", a.last_seen or "-"]
    out.append(", ".join(row.flags) or "-")
    return out


def format_inventory(inv: Inventory, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(inv.as_dict(), indent=2, sort_keys=True)
    header = ["PRINCIPAL", "OWNER", "IDENTITY", "GRANTS"]
    if inv.with_logs:
        header += ["ALLOWED", "DENIED", "FIRST SEEN", "LAST SEEN"]
    header.append("FLAGS")
    rows = [_cells(r, inv.with_logs) for r in inv.principals]
    lines = [f"Inventory of policy {inv.policy_version}: {len(inv.principals)} declared "
             f"principal(s), {inv.flagged()} flagged"]
    lines += ["", *table(header, rows, markdown=fmt == "markdown")]
    if inv.with_logs:
        lines += ["", f"Seen in the logs but never declared ({len(inv.undeclared)}"
                  + (f", {inv.undeclared_overflow} more not tracked" if inv.undeclared_overflow
                     else "") + "):"]
        if inv.undeclared:
            lines += ["", *table(
                ["PRINCIPAL", "ALLOWED", "DENIED", "FIRST SEEN", "LAST SEEN"],
                [[p, str(a.allowed), str(a.denied), a.first_seen, a.last_seen]
                 for p, a in inv.undeclared], markdown=fmt == "markdown")]
        else:
            lines.append("  (none)")
        lines.append(f"Unauthenticated decisions (no identity): {inv.unauthenticated}")
    return "\n".join(lines)


def table(header: list[str], rows: list[list[str]], *, markdown: bool = False) -> list[str]:
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
        out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in esc[1:]]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
