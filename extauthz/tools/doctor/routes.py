"""Which request paths a route matches, read the way Envoy reads its route table.

A route that skips ext_authz is only as narrow as its match, and route matches are wider than
they look: `prefix` is a plain string prefix (`/health` matches `/healthcare/patients/42`),
`safe_regex` must match the whole path but RE2 `.*` is generous, `case_sensitive: false`
accepts every spelling, and without `normalize_path` Envoy routes `/health/../admin` on its
raw text while the upstream resolves it to `/admin`. `exposure()` turns one RouteMatch plus the
connection manager's normalization into a predicate over paths, a sentence and example paths,
so a finding can say exactly what an exemption opens, and which policy rules it shadows.

Facts used (Envoy 1.40, API docs of RouteMatch and HttpConnectionManager, observed with the real
binary in tests/cases/doctor/real-world): prefix/path/path_separated_prefix are case-sensitive
unless case_sensitive is false (ignored for regexes); path, path_separated_prefix and safe_regex
ignore the query string; safe_regex is a full match; normalization happens before routing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from extauthz.policy.compiled import path_matches, regex_bucket
from extauthz.policy.document import PathMatch
from extauthz.tools.doctor.envoy import HEALTH_PATHS

_ESCAPED = "%2F..%2Fadmin"
_DOTS = "/../admin"


@dataclass(frozen=True, slots=True)
class Normalization:
    """The HCM settings that decide which raw paths reach a route."""

    normalize_path: bool
    merge_slashes: bool
    escaped_slashes_kept: bool


@dataclass(frozen=True, slots=True)
class Exposure:
    kind: str  # prefix | path | path_separated_prefix | safe_regex | other
    value: str
    summary: str  # "every path starting with '/health' ..."
    examples: tuple[str, ...]
    everything: bool  # every path of the host (directly or through dot segments)
    quiet: bool  # an exact health path: expected to be open
    analysed: bool
    matches: Callable[[str], bool]

    def describe(self, limit: int = 4) -> str:
        shown = ", ".join(self.examples[:limit])
        return f"{self.summary}" + (f"; e.g. {shown}" if shown else "")


def label(match: Any) -> str:
    if match is None:
        return "no match"
    for kind in ("path", "prefix", "path_separated_prefix"):
        value = getattr(match, kind, None)
        if value is not None:
            return f"{kind} {value}"
    if match.safe_regex is not None:
        return f"regex {match.safe_regex.regex}"
    return "a matcher extension"


def _fold(case_sensitive: bool) -> Callable[[str], str]:
    return (lambda s: s) if case_sensitive else str.lower


def exposure(match: Any, norm: Normalization) -> Exposure:
    """What a route with this RouteMatch opens when ext_authz is skipped on it."""
    if match is None:
        return Exposure("other", "", "no match (never selected)", (), False, True, True,
                        lambda _p: False)
    case = match.case_sensitive is not False
    fold = _fold(case)
    if match.path is not None:
        value = str(match.path)
        return _exposure("path", value, case, lambda p: fold(p) == fold(value), [value], norm=norm)
    if match.path_separated_prefix is not None:
        value = str(match.path_separated_prefix)
        return _exposure(
            "path_separated_prefix", value, case,
            lambda p: fold(p) == fold(value) or fold(p).startswith(fold(value) + "/"),
            [value, f"{value}/anything"], norm=norm)
    if match.prefix is not None:
        value = str(match.prefix)
        base = value or "/"
        examples = [base, f"{base}anything" if base.endswith("/") else f"{base}/anything"]
        if not base.endswith("/"):
            examples += [f"{base}-admin/x", f"{base}care/x"]
        return _exposure("prefix", value, case, lambda p: fold(p).startswith(fold(value)),
                         examples, norm=norm)
    if match.safe_regex is not None:
        pattern = str(match.safe_regex.regex)
        try:
            compiled = re2.compile(pattern)
        except re2.error:
            return Exposure("safe_regex", pattern, f"paths matching regex {pattern!r} (RE2 "
                            "syntax this doctor cannot compile: not analysed)", (), False,
                            False, False, lambda _p: False)
        return _exposure("safe_regex", pattern, True,
                         lambda p: compiled.fullmatch(p) is not None,
                         _regex_candidates(pattern), norm=norm)
    return Exposure("other", "", "paths selected by a matcher extension (not analysed)", (),
                    False, False, False, lambda _p: False)


def _regex_candidates(pattern: str) -> list[str]:
    literal = ""
    body = pattern[1:] if pattern.startswith("^") else pattern
    for ch in body:
        if ch in ".[]()*+?{}|\\^$":
            break
        literal += ch
    base = literal or "/"
    stem = base.rstrip("/") or ""
    return [base, f"{stem}/anything", f"{base}x", f"{base}1", f"{base}x/y", f"{stem}-admin/x",
            f"{stem}/1", "/", "/admin", "/any/deep/path"]


def _exposure(
    kind: str, value: str, case: bool, matches: Callable[[str], bool], candidates: list[str], *,
    norm: Normalization,
) -> Exposure:
    examples = [c for c in dict.fromkeys(candidates) if matches(c)]
    everything = matches("/admin") and matches("/any/deep/path") and matches("/")
    if kind == "path":
        quiet = value.rstrip("/") in HEALTH_PATHS or (not case and value.lower() in HEALTH_PATHS)
        summary = f"exactly {value}" + ("" if case else " in any letter case")
        if not case:
            examples.append(value.upper())
        return Exposure(kind, value, summary, tuple(examples), False, quiet, True, matches)
    summary = {
        "prefix": f"every path starting with {value!r} (a string prefix, not a path segment)",
        "path_separated_prefix": f"{value} and every path below {value}/",
        "safe_regex": f"every path the RE2 regex {value!r} fully matches",
    }[kind]
    if everything:
        summary = f"every path ({label_kind(kind)} {value!r})"
    if not case:
        summary += " in any letter case"
        examples += [e.upper() for e in examples[:2]]
    if examples and not everything:
        seed = examples[0].rstrip("/") or ""
        if not norm.normalize_path and matches(seed + _DOTS):
            everything = True
            examples.append(f"{seed}{_DOTS}")
            summary += ("; without normalize_path also every other path through dot segments "
                        f"({seed}{_DOTS} is routed here and resolved to /admin upstream)")
        if norm.escaped_slashes_kept and matches(seed + _ESCAPED):
            examples.append(seed + _ESCAPED)
            summary += (f"; with escaped slashes kept also {seed}{_ESCAPED}, which an upstream "
                        "that decodes %2F serves as /admin")
            everything = True
    return Exposure(kind, value, summary, tuple(dict.fromkeys(examples)), everything, False,
                    True, matches)


def label_kind(kind: str) -> str:
    return "regex" if kind == "safe_regex" else kind


def rule_samples(path: PathMatch) -> list[str]:
    """Concrete request paths a policy rule applies to, to test against a route."""
    value = path.value
    if path.kind == "exact":
        return [value]
    if path.kind == "prefix":
        return [value, "/x"] if value == "/" else [value, value.rstrip("/") + "/x"]
    if path.kind in ("template", "template_prefix"):
        filled = "/".join("x" if seg.startswith("{") else seg for seg in value.split("/"))
        return [filled] + ([filled.rstrip("/") + "/x"] if path.kind == "template_prefix" else [])
    bucket = regex_bucket(value) or "/"
    try:
        compiled = re2.compile(value)
    except re2.error:
        return []
    cands = [bucket, bucket + "x", bucket + "1", bucket + "x/y", "/", "/x"]
    return [c for c in cands if compiled.fullmatch(c) is not None]


def shadows(exp: Exposure, path: PathMatch, examples: Sequence[str] = ()) -> bool:
    """Can a request for this rule's path be served by the route without a check?"""
    if exp.everything:
        return True
    if any(exp.matches(s) for s in rule_samples(path)):
        return True
    return any(path_matches(path, e) for e in (examples or exp.examples) if e.startswith("/"))
