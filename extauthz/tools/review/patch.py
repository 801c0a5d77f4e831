"""The suggested patch: a unified diff of the policy files that makes a report's changes.

Kept apart from the analysis: it edits YAML text (rule blocks located by line), which the
review itself never needs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from extauthz.policy.compiled import CompiledPolicy, compile_policy
from extauthz.policy.document import LineMap, PolicyError, load_yaml, parse_document
from extauthz.tools.review.results import Report, RuleChange


class PatchError(ValueError):
    """The suggested policy could not be produced or does not load (a bug: never applied)."""


@dataclass(frozen=True, slots=True)
class Patch:
    diff: str
    files: dict[str, str]  # source -> new text (only the changed files)
    skipped: tuple[str, ...]  # rules that could not be rewritten, with why


def _plain(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _rule_blocks(text: str, rules: list[LineMap]) -> list[tuple[int, int, int] | None]:
    """(first line index, end index (exclusive), dash column) of each rule item, or None."""
    lines = text.splitlines()
    out: list[tuple[int, int, int] | None] = []
    for i, rule in enumerate(rules):
        start = (rule.line or 0) - 1
        m = re.match(r"^(\s*)-\s", lines[start]) if 0 <= start < len(lines) else None
        if m is None:
            out.append(None)
            continue
        col = len(m.group(1))
        stop = (rules[i + 1].line or 0) - 1 if i + 1 < len(rules) else len(lines)
        end = start + 1
        while end < stop:
            s = lines[end]
            if s.strip() and not s.lstrip().startswith("#") and len(s) - len(s.lstrip()) <= col:
                break
            end += 1
        while end > start + 1 and (not lines[end - 1].strip()
                                   or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        out.append((start, end, col))
    return out


def _rewrite(raw: Mapping[str, Any], change: RuleChange) -> list[dict[str, Any]]:
    base = dict(_plain(raw))  # type: ignore[call-overload]
    if change.remove_rule:
        return []
    allow = [e for e in base.get("allow") or [] if e not in change.remove_entries] \
        if isinstance(base.get("allow"), list) else base.get("allow")
    if isinstance(base.get("allow"), str) and base["allow"] in change.remove_entries:
        allow = []
    if "allow" in base:
        if allow:
            base["allow"] = allow
        else:
            del base["allow"]
    if change.methods is not None:
        base["methods"] = list(change.methods)
    if not change.splits:
        return [base]
    out = []
    kept = set(allow or [])
    for s in change.splits:
        rule: dict[str, Any] = {}
        for key, value in base.items():
            if key in ("path", "path_prefix", "path_regex"):
                rule["path"] = s.path
            elif key == "name":
                rule["name"] = s.name
            elif key == "methods":
                rule["methods"] = list(s.methods)
            elif key == "allow":
                rule["allow"] = [e for e in s.allow if e in kept]
            else:
                rule[key] = value
        if "methods" not in rule:
            rule = {"name": rule.pop("name"), "methods": list(s.methods), **rule}
        if rule.get("allow"):
            out.append(rule)
    return out


def _dump(rules: list[dict[str, Any]], col: int) -> list[str]:
    if not rules:
        return []
    text = yaml.safe_dump(rules, default_flow_style=None, sort_keys=False, width=1000)
    return [" " * col + line for line in text.splitlines()]


def render_patch(report: Report, texts: Mapping[str, str]) -> Patch:
    """A unified diff (`a/<file>` / `b/<file>`, apply with `patch -p1` in the policy directory)
    that makes the changes of `report`. The rewritten rules lose comments inside them."""
    by_source: dict[str, list[RuleChange]] = {}
    for c in report.changes.values():
        by_source.setdefault(c.source, []).append(c)
    files: dict[str, str] = {}
    skipped: list[str] = []
    diffs: list[str] = []
    for source in sorted(by_source):
        text = texts.get(source)
        if text is None:
            skipped += [f"{c.rule}: {source} was not supplied" for c in by_source[source]]
            continue
        data = load_yaml(text, source)
        raw_rules = data.get("rules") if isinstance(data, Mapping) else None
        if not isinstance(raw_rules, list):
            continue
        blocks = _rule_blocks(text, raw_rules)
        wanted = {c.rule: c for c in by_source[source]}
        lines = text.splitlines()
        edits: list[tuple[int, int, list[str]]] = []
        for raw, block in zip(raw_rules, blocks, strict=True):
            change = wanted.get(str(raw.get("name")))
            if change is None:
                continue
            if block is None:
                skipped.append(f"{change.rule}: cannot locate its block in {source}")
                continue
            start, end, col = block
            edits.append((start, end, _dump(_rewrite(raw, change), col)))
        for start, end, new in sorted(edits, reverse=True):
            lines[start:end] = new
        new_text = "\n".join(lines) + ("\n" if text.endswith("\n") or not text else "")
        if new_text == text:
            continue
        files[source] = new_text
        diffs.append("".join(difflib.unified_diff(
            text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            f"a/{source}", f"b/{source}")))
    return Patch("".join(diffs), files, tuple(sorted(skipped)))


def check_patch(texts: Mapping[str, str], patch: Patch, version: str = "suggested") -> \
        CompiledPolicy:
    """Load the patched policy the way `extauthz validate` does; raises PatchError."""
    merged = {**texts, **patch.files}
    try:
        docs = [parse_document(load_yaml(t, s), s) for s, t in sorted(merged.items())]
        return compile_policy(docs, version)
    except PolicyError as exc:
        raise PatchError(f"the suggested policy does not load: {exc}") from exc
