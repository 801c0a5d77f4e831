"""`extauthz inventory | review`: who calls what, and the standing trust nobody uses.

Exit codes: 0 success, 1 findings at or above `--fail-on`, 2 usage error (a policy that does
not load, a log that cannot be opened, a bad duration).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from extauthz.policy.compiled import CompiledPolicy
from extauthz.policy.document import LineMap, PolicyError, load_yaml
from extauthz.sources.policy_store import PolicyLoadError, load_policy, read_files
from extauthz.tools.inventory import (
    DEFAULT_WIDTH,
    FORMATS,
    InventoryBuilder,
    format_inventory,
    table,
    to_csv,
)
from extauthz.tools.logread import LogReadError, ReadStats, iter_records
from extauthz.tools.review import (
    SEVERITIES,
    Finding,
    PatchError,
    Report,
    ReviewConfig,
    Reviewer,
    check_patch,
    render_patch,
)

OK, FAILED, USAGE = 0, 1, 2
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    m = _DURATION.match(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"{text!r} is not a duration like 90s, 15m, 12h, 30d or 2w")
    return float(m.group(1)) * _UNITS[m.group(2)]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    i = sub.add_parser(
        "inventory", help="every declared calling workload: owner, identity, grants, activity",
        description="List every principal the policy declares with its owner, identity and the "
        "rules that grant it access; with --logs also when it was first and last seen and how "
        "many calls were allowed and denied, and the principals seen but never declared.")
    i.add_argument("--policy", metavar="DIR", type=Path, required=True)
    i.add_argument("--logs", metavar="FILE", nargs="+", action="extend", default=[],
                   help="decision-log files (plain or gzip; '-' = stdin)")
    i.add_argument("--format", choices=FORMATS, default="auto",
                   help="auto (a table if it fits the terminal, else one block per "
                   "principal), table (long cells wrapped), cards, markdown, csv, json")
    i.add_argument("--width", type=int, metavar="COLUMNS",
                   help="line width for table/auto (default: the terminal's, else "
                   f"{DEFAULT_WIDTH})")
    i.set_defaults(run=_inventory)

    r = sub.add_parser(
        "review", help="access review of decision logs: unused grants, dry-run readiness, "
        "suspicious denials, credential hygiene, a suggested tightened policy",
        description="Stream decision logs against the policy and report the standing trust "
        "nobody uses. The first --policy is the policy under review (and the one --patch-out "
        "is made against); further --policy directories and the subdirectories of "
        "--policy-history are earlier versions, used to attribute their decisions.")
    r.add_argument("--policy", metavar="DIR", type=Path, action="append", required=True)
    r.add_argument("--policy-history", metavar="DIR", type=Path,
                   help="a directory whose subdirectories are earlier policy versions")
    r.add_argument("--logs", metavar="FILE", nargs="+", action="extend", required=True,
                   help="decision-log files (plain or gzip; '-' = stdin)")
    r.add_argument("--since", metavar="DURATION", help="only decisions this recent (e.g. 30d)")
    r.add_argument("--now", metavar="ISO8601", help="end of the window (default: now)")
    r.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table",
                   help="table (findings wrapped to the width), markdown, csv, json")
    r.add_argument("--width", type=int, metavar="COLUMNS",
                   help="line width for the table (default: the terminal's, else "
                   f"{DEFAULT_WIDTH})")
    r.add_argument("--fail-on", choices=(*SEVERITIES, "none"), default="none",
                   help="exit 1 when a finding of this severity or higher exists")
    r.add_argument("--patch-out", metavar="FILE", type=Path,
                   help="write the suggested tightened policy here as a unified diff "
                   "(apply in the policy directory with `patch -p1`); never applied")
    r.add_argument("--revocations", metavar="FILE", type=Path,
                   help="the revocation list (principals still trying / still granted)")
    r.add_argument("--max-token-lifetime", metavar="DURATION",
                   help="flag JWT callers whose tokens live longer (needs token_lifetime_s)")
    r.add_argument("--trust-domain", metavar="TD", action="append", default=[],
                   help="an expected trust domain (default: those the policy names)")
    r.add_argument("--min-denials", type=int, default=5, metavar="N",
                   help="report a principal denied at least N times on a host (default 5)")
    r.add_argument("--burst", type=int, default=20, metavar="N",
                   help="report N or more 401s to a host within a minute (default 20)")
    r.set_defaults(run=_review)


# --- inputs ----------------------------------------------------------------------------------


def _load(directory: Path) -> CompiledPolicy:
    try:
        return load_policy(directory)
    except (PolicyLoadError, PolicyError) as exc:
        raise UsageError(f"{exc} (run `extauthz validate {directory}`)") from None


def policy_texts(directory: Path) -> dict[str, str]:
    return {str(f.path.relative_to(directory)): f.text.decode("utf-8")
            for f in read_files(directory)}


def explicit_owners(texts: dict[str, str]) -> frozenset[str]:
    """Principal names whose declaration writes its own `owner:`."""
    names = set()
    for source, text in texts.items():
        data = load_yaml(text, source)
        for p in (data.get("principals") or []) if isinstance(data, LineMap) else []:
            if isinstance(p, dict) and "owner" in p:
                names.add(str(p.get("name")))
    return frozenset(names)


def _records(names: list[str], stats: ReadStats) -> Iterator[dict[str, Any]]:
    """The records, with the cyclic garbage collector paused while they stream: records are
    acyclic and freed by reference counting, and a collector walking the review's (bounded)
    tables every few thousand records costs a third of the run time on big logs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield from iter_records(names, stats)
    finally:
        if enabled:
            gc.enable()


def _history(args: argparse.Namespace) -> list[CompiledPolicy]:
    dirs = list(args.policy[1:])
    if args.policy_history is not None:
        if not args.policy_history.is_dir():
            raise UsageError(f"{args.policy_history}: not a directory")
        dirs += sorted(p for p in args.policy_history.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
    return [_load(d) for d in dirs]


def _config(args: argparse.Namespace) -> ReviewConfig:
    start = end = ""
    if args.now or args.since:
        now = datetime.now(UTC)
        if args.now:
            try:
                now = datetime.fromisoformat(args.now.replace("Z", "+00:00"))
            except ValueError:
                raise UsageError(f"--now {args.now!r} is not an ISO 8601 time") from None
            now = now if now.tzinfo else now.replace(tzinfo=UTC)
            end = rfc3339(now)
        if args.since:
            start = rfc3339(now - timedelta(seconds=parse_duration(args.since)))
    revoked: frozenset[str] = frozenset()
    if args.revocations is not None:
        from extauthz.sources.revocation import RevocationError, load_revocations

        try:
            revoked = load_revocations(args.revocations).principals
        except RevocationError as exc:
            raise UsageError(str(exc)) from None
    return ReviewConfig(
        window_start=start, window_end=end,
        max_token_lifetime=(parse_duration(args.max_token_lifetime)
                            if args.max_token_lifetime else None),
        trust_domains=frozenset(args.trust_domain), revoked_principals=revoked,
        min_denials=max(1, args.min_denials), burst_per_minute=max(1, args.burst))


# --- commands --------------------------------------------------------------------------------


def _inventory(args: argparse.Namespace) -> int:
    try:
        policy = _load(args.policy)
        owners = explicit_owners(policy_texts(args.policy))
        stats = ReadStats()
        builder = InventoryBuilder(policy, owners)
        builder.feed_all(_records(args.logs, stats))
    except (UsageError, LogReadError) as exc:
        print(f"extauthz inventory: {exc}", file=sys.stderr)
        return USAGE
    inv = builder.result(with_logs=bool(args.logs))
    if args.format == "json":
        out = inv.as_dict()
        out["read"] = stats.as_dict() if args.logs else None
        print(json.dumps(out, indent=2, sort_keys=True))
    elif args.format == "csv":
        print(format_inventory(inv, "csv"))
    else:
        print(format_inventory(inv, args.format, _width(args)))
        if args.logs:
            print(_read_line(stats))
    return OK


def _review(args: argparse.Namespace) -> int:
    try:
        policy = _load(args.policy[0])
        texts = policy_texts(args.policy[0])
        reviewer = Reviewer(policy, _history(args), _config(args))
        stats = ReadStats()
        reviewer.feed_all(_records(args.logs, stats))
    except (UsageError, LogReadError) as exc:
        print(f"extauthz review: {exc}", file=sys.stderr)
        return USAGE
    report = reviewer.report()
    if stats.skipped:
        report.findings.append(Finding(
            "info", "unreadable_lines", "(logs)",
            f"{stats.skipped} log lines skipped: {stats.malformed} malformed, "
            f"{stats.truncated} truncated, {stats.oversized} oversized", stats.as_dict()))
        report.findings.sort(key=Finding.sort_key)
    patch_note = "not requested (--patch-out FILE)"
    patch_rules: list[str] = []
    if args.patch_out is not None:
        patch = render_patch(report, texts)
        try:
            check_patch(texts, patch)
        except PatchError as exc:
            print(f"extauthz review: {exc}; no patch written", file=sys.stderr)
            return USAGE
        args.patch_out.write_text(patch.diff, encoding="utf-8")
        patch_rules = sorted(report.changes)
        patch_note = (f"{args.patch_out} ({len(patch.files)} file(s), rules: "
                      f"{', '.join(patch_rules)}); review it, then `patch -p1 < "
                      f"{args.patch_out}` in {args.policy[0]}" if patch.diff
                      else f"{args.patch_out} (empty: nothing to tighten)")
        for why in patch.skipped:
            patch_note += f"\n  not rewritten: {why}"
    if args.format == "json":
        print(json.dumps({"summary": report.summary, "read": stats.as_dict(),
                          "findings": [f.as_dict() for f in report.findings],
                          "patch": {"file": str(args.patch_out) if args.patch_out else None,
                                    "rules": patch_rules}}, indent=2, sort_keys=True))
    elif args.format == "csv":
        print(to_csv(["severity", "kind", "subject", "message"],
                     [[f.severity, f.kind, f.subject, f.message] for f in report.findings]))
    else:
        print(format_report(report, stats, args.format, patch_note, _width(args)))
    if args.fail_on != "none" and report.at_least(args.fail_on):
        return FAILED
    return OK


# --- output ----------------------------------------------------------------------------------


def _read_line(stats: ReadStats) -> str:
    return (f"Read {stats.lines} lines from {stats.files} file(s): {stats.records} records, "
            f"{stats.malformed} malformed, {stats.truncated} truncated, "
            f"{stats.oversized} oversized")


def _width(args: argparse.Namespace) -> int:
    if args.width is not None:
        return max(40, int(args.width))
    if sys.stdout.isatty():
        return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns
    return DEFAULT_WIDTH


def format_report(report: Report, stats: ReadStats, fmt: str = "table",
                  patch_note: str = "", width: int = DEFAULT_WIDTH) -> str:
    s = report.summary
    w = s["window"]
    md = fmt == "markdown"
    versions = ", ".join(f"{v} ({n})" for v, n in s["by_version"].items()) or "none"
    unknown = ", ".join(f"{v} ({n})" for v, n in s["unknown_versions"].items()) or "none"
    head = [
        f"Access review of policy {s['policy_version']}",
        f"Window: {w['start'] or 'start of logs'} .. {w['end'] or 'end of logs'} "
        f"(records from {w['first_record'] or '-'} to {w['last_record'] or '-'})",
        _read_line(stats),
        f"Decisions in window: {s['in_window']} ({s['outside_window']} outside); by policy "
        f"version: {versions}; unknown versions (not attributed): {unknown}",
    ]
    counts: dict[str, int] = {}
    for f in report.findings:
        counts[f.severity] = counts.get(f.severity, 0) + 1
    head.append("Findings: " + (", ".join(f"{counts[k]} {k}" for k in reversed(SEVERITIES)
                                          if k in counts) or "none"))
    lines = [f"## {head[0]}", "", *(f"- {h}" for h in head[1:]), ""] if md else [*head, ""]
    rows = [[f.severity, f.kind, f.subject, f.message] for f in report.findings]
    if rows:
        lines += table(["SEVERITY", "KIND", "SUBJECT", "FINDING"], rows, markdown=md,
                       width=width)
    if patch_note:
        lines += ["", f"Suggested patch: {patch_note}"]
    return "\n".join(lines)
