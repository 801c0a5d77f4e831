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
  `refused-only`: it was presented, but every time refused (revoked, or of an untrusted trust
  domain: a 401 whose `presented_principal` names it) -- counted in REFUSED, so a revoked
  workload that keeps trying is never mistaken for an unused one.
* undeclared principals (seen in the logs, declared nowhere) are listed apart.

The figures it shares with `extauthz review` (records, unauthenticated 401s, refused
presentations per identity) are counted by the same rules, from the same fields.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.identity.spiffe import SpiffePattern, parse_spiffe_id
from extauthz.model import Reason
from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import PrincipalDecl
from extauthz.tools.review import describe_route, identity_of

_CACHE = 100_000
# 401s that name the identity that was presented and refused (decision log 1.1).
_REFUSALS = frozenset({Reason.REVOKED.value, Reason.UNTRUSTED_TRUST_DOMAIN.value})


@dataclass(slots=True)
class Activity:
    allowed: int = 0
    denied: int = 0
    refused: int = 0  # presented but refused before any rule (401 revoked / untrusted)
    first_seen: str = ""
    last_seen: str = ""

    def add(self, t: str, allowed: bool, refused: bool = False) -> None:
        if refused:
            self.refused += 1
        elif allowed:
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
                "refused": a.refused if a else None,
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
    records: int = 0

    def flagged_names(self) -> list[str]:
        """The rows the summary line counts as flagged: declarations with a flag, then the
        undeclared principals seen in the logs."""
        return [p.name for p in self.principals if p.flags] + [u for u, _ in self.undeclared]

    def flagged(self) -> int:
        return len(self.flagged_names())

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version,
            "principals": [p.as_dict() for p in self.principals],
            "undeclared": [{"principal": p, "allowed": a.allowed, "denied": a.denied,
                            "refused": a.refused,
                            "first_seen": a.first_seen, "last_seen": a.last_seen}
                           for p, a in self.undeclared] if self.with_logs else None,
            "undeclared_overflow": self.undeclared_overflow,
            "unauthenticated": self.unauthenticated if self.with_logs else None,
            "records": self.records if self.with_logs else None,
            "flagged": self.flagged_names(),
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
        if not isinstance(t, str) or not isinstance(rec.get("reason"), str):
            return  # as `review` counts records: a time and a reason
        self.records += 1
        refused = False
        if rec.get("status") == 401:  # no identity was accepted (review: "unauthenticated")
            self.unauthenticated += 1
            presented = rec.get("presented_principal")
            if rec.get("reason") not in _REFUSALS or not isinstance(presented, str) \
                    or not presented:
                return
            rec = {**rec, "principal": presented}
            refused = True
        ident = identity_of(rec)
        if ident is None:
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
            self.activity.setdefault(name, Activity()).add(t, allowed, refused)
            return
        seen = self.undeclared.get(ident.principal)
        if seen is None:
            if len(self.undeclared) >= self.max_undeclared:
                self.undeclared_overflow += 1
                return
            seen = self.undeclared[ident.principal] = Activity()
        seen.add(t, allowed, refused)

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
            elif act is not None and act.refused and not (act.allowed or act.denied):
                flags.append("refused-only")
            rows.append(PrincipalRow(
                name, p.owner if p.owner != "" else "", identity_text(p),
                p.source + (f" (owner of file: {doc_owner.get(p.source, '?')})"
                            if "owner-inherited" in flags else ""),
                tuple(sorted(grants)), tuple(sorted(anyone)), act, tuple(flags)))
        undeclared = tuple(sorted(self.undeclared.items())) if with_logs else ()
        return Inventory(policy.version, tuple(rows), undeclared, self.undeclared_overflow,
                         self.unauthenticated, with_logs, self.records)


# --- output ----------------------------------------------------------------------------------

# Formats: `table` wraps long cells to the width; `cards` is one block per principal (what
# `auto` picks when even a wrapped table would be hard to read); csv and json keep every
# character for other tools.
FORMATS = ("auto", "table", "cards", "markdown", "csv", "json")
DEFAULT_WIDTH = 120
MIN_COLUMN = 12
_BREAKS = re.compile(r"(?<=[ /;,])")  # fixed: where a long cell may wrap


def _header(with_logs: bool) -> list[str]:
    header = ["PRINCIPAL", "OWNER", "IDENTITY", "GRANTS"]
    if with_logs:
        header += ["ALLOWED", "DENIED", "REFUSED", "FIRST SEEN", "LAST SEEN"]
    return [*header, "FLAGS"]


def _cells(row: PrincipalRow, with_logs: bool) -> list[str]:
    grants = "; ".join(g.split(":", 1)[0] for g in row.grants) or "-"
    if row.any_caller:
        grants += f" (+ any caller: {', '.join(row.any_caller)})"
    name = f"! {row.name}" if row.flags else row.name  # the rows the summary line counts
    out = [name, row.owner or "-", row.identity, grants]
    if with_logs:
        a = row.activity or Activity()
        out += [str(a.allowed), str(a.denied), str(a.refused), a.first_seen or "-",
                a.last_seen or "-"]
    out.append(", ".join(row.flags) or "-")
    return out


def _summary_line(inv: Inventory) -> str:
    flagged = inv.flagged_names()
    line = (f"Inventory of policy {inv.policy_version}: {len(inv.principals)} declared "
            f"principal(s), {len(flagged)} flagged")
    if flagged:
        shown = ", ".join(flagged[:10]) + (f" and {len(flagged) - 10} more"
                                           if len(flagged) > 10 else "")
        line += f" (marked !): {shown}"
    return line


def format_inventory(inv: Inventory, fmt: str = "auto", width: int = DEFAULT_WIDTH) -> str:
    if fmt == "json":
        return json.dumps(inv.as_dict(), indent=2, sort_keys=True)
    header = _header(inv.with_logs)
    rows = [_cells(r, inv.with_logs) for r in inv.principals]
    if fmt == "csv":
        return to_csv(header, [[c.removeprefix("! ") for c in r] for r in rows])
    if fmt == "auto":
        fmt = "table" if fits(header, rows, width) else "cards"
    lines = [*wrap(_summary_line(inv), width), ""]
    if fmt == "cards":
        lines += _cards(inv)
    else:
        lines += table(header, rows, markdown=fmt == "markdown", width=width)
    if inv.with_logs:
        lines += ["", f"Seen in the logs but never declared ({len(inv.undeclared)}"
                  + (f", {inv.undeclared_overflow} more not tracked" if inv.undeclared_overflow
                     else "") + "):"]
        if inv.undeclared:
            lines += ["", *table(
                ["PRINCIPAL", "ALLOWED", "DENIED", "REFUSED", "FIRST SEEN", "LAST SEEN"],
                [[p, str(a.allowed), str(a.denied), str(a.refused), a.first_seen, a.last_seen]
                 for p, a in inv.undeclared], markdown=fmt == "markdown", width=width)]
        else:
            lines.append("  (none)")
        lines.append(f"Decisions: {inv.records}; unauthenticated (401, no identity accepted): "
                     f"{inv.unauthenticated}")
    return "\n".join(lines)


def _cards(inv: Inventory) -> list[str]:
    out: list[str] = []
    for row in inv.principals:
        flags = f"  [{', '.join(row.flags)}]" if row.flags else ""
        out.append(("! " if row.flags else "") + row.name + flags)
        out.append(f"    owner:     {row.owner or '-'}")
        out.append(f"    identity:  {row.identity}")
        out.append(f"    declared:  {row.declared_in}")
        for i, grant in enumerate(row.grants or ("-",)):
            out.append(f"    {'grants:' if i == 0 else '':10} {grant}")
        if row.any_caller:
            out.append(f"    any-caller rules: {', '.join(row.any_caller)}")
        if inv.with_logs:
            a = row.activity or Activity()
            out.append(f"    activity:  {a.allowed} allowed, {a.denied} denied, {a.refused} "
                       f"refused; {a.first_seen or '-'} .. {a.last_seen or '-'}")
        out.append("")
    return out[:-1] if out else out


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")


def fits(header: list[str], rows: list[list[str]], width: int) -> bool:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return sum(widths) + 2 * (len(widths) - 1) <= width


def _fit_widths(header: list[str], rows: list[list[str]], width: int) -> list[int]:
    """Column widths within `width`: the widest columns give way first (to MIN_COLUMN)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    floor = [max(len(h), min(w, MIN_COLUMN)) for h, w in zip(header, widths, strict=True)]
    budget = width - 2 * (len(widths) - 1)
    while sum(widths) > budget:
        i = max(range(len(widths)), key=lambda k: widths[k] - floor[k])
        if widths[i] <= floor[i]:
            break  # cannot shrink further: the line will be wider than asked
        widths[i] -= 1
    return widths


def wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width`, broken after a space or a `/` (SPIFFE IDs and paths stay
    readable); a piece longer than the width is cut."""
    lines: list[str] = []
    line = ""
    for part in _BREAKS.split(text):
        if not part:
            continue
        if len(line) + len(part.rstrip()) > width and line:
            lines.append(line.rstrip())
            line = ""
        rest = part
        while len(rest.rstrip()) > width:
            lines.append(rest[:width])
            rest = rest[width:]
        line += rest if line or not rest.isspace() else ""
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


def table(header: list[str], rows: list[list[str]], *, markdown: bool = False,
          width: int | None = None) -> list[str]:
    """Aligned columns; with `width`, long cells wrap inside their column."""
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
        out = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in esc[1:]]
    if width is None:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    else:
        widths = _fit_widths(header, rows, width)

    def lines(cells: list[str]) -> list[str]:
        wrapped = [wrap(c, w) for c, w in zip(cells, widths, strict=True)]
        height = max(len(w) for w in wrapped)
        return ["  ".join((w[k] if k < len(w) else "").ljust(n)
                          for w, n in zip(wrapped, widths, strict=True)).rstrip()
                for k in range(height)]

    out = [*lines(header), "  ".join("-" * w for w in widths)]
    for r in rows:
        out += lines(r)
    return out
