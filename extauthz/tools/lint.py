"""`extauthz validate`: everything the loader rejects, plus warnings about risky policies.

Errors (the server would refuse to load the directory): YAML and schema errors with
file:line, unknown principal names, duplicate names. All files are checked, not just the
first bad one. Warnings (the policy loads, but probably not as intended):

* `dangerous-wildcard`  `allow: ["*"]` (or a whole-trust-domain pattern) on a write method
* `allow-all-path`      an allow rule for every path of a host (`path_prefix: /`, `.*`)
* `duplicate-rule`      two rules with the same route, filters, mode and principals
* `shadowed-rule`       an allow rule whose every caller is denied by an enforce deny rule
                        covering its whole route (it can never allow anything)
* `unreachable-rule`    no request can reach the rule (a regex that cannot match a path
                        starting with '/', characters the normalizer rejects, a condition
                        that is always false)
* `constant-condition`  a `when` that is always true
* `unindexed-regex`     a path_regex without a literal leading segment, tried on every
                        request for its host
* `path-parameters`     an allow rule whose path expects `;params`: such a request is allowed
                        only if its parameter-free form is allowed too (matcher.py)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from extauthz.identity.spiffe import SpiffePattern, parse_spiffe_id
from extauthz.policy.compiled import CompiledPolicy, compile_policy, regex_bucket
from extauthz.policy.document import (
    WRITE_METHODS,
    PolicyDocument,
    PolicyError,
    PrincipalDecl,
    RuleDecl,
    load_yaml,
    parse_document,
)
from extauthz.policy.paths import normalize_path
from extauthz.sources.policy_store import PolicyLoadError, read_files, version_of
from extauthz.tools.findings import Finding, Severity

ERROR = Severity.ERROR
WARNING = Severity.WARNING
_ALL_PATH_REGEXES = frozenset({".*", "/.*", "^/.*", "^/.*$", "/.*$", "^.*$", ".+", "/.+"})


def _finding(
    severity: Severity, code: str, file: str, line: int | None, message: str, *, rule: str = ""
) -> Finding:
    return Finding(code, severity, message, file=file, line=line, subject=rule)


def finding_text(f: Finding) -> str:
    """`file:line: severity: message [code]`, the compiler-style line editors jump to."""
    where = f"{f.file}:{f.line}" if f.line is not None else f.file
    return f"{where}: {f.severity.label}: {f.message} [{f.code}]"


def finding_dict(f: Finding) -> dict[str, object]:
    """The JSON shape `extauthz validate --format json` has always printed."""
    return {"severity": f.severity.label, "code": f.code, "file": f.file, "line": f.line,
            "message": f.message, "rule": f.subject}


@dataclass(frozen=True, slots=True)
class Report:
    findings: tuple[Finding, ...]
    policy: CompiledPolicy | None
    files: int

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == ERROR)

    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == WARNING)


def validate_directory(directory: Path) -> Report:
    try:
        files = read_files(directory)
    except PolicyLoadError as exc:
        return Report((_finding(ERROR, "load", str(directory), None, str(exc)),), None, 0)
    findings: list[Finding] = []
    docs: list[PolicyDocument] = []
    for f in files:
        source = str(f.path.relative_to(directory))
        try:
            docs.append(parse_document(load_yaml(f.text, source), source))
        except PolicyError as exc:
            findings.append(_from_error(exc))
    findings += _cross_file_errors(docs)
    policy = None
    if not findings:
        try:
            policy = compile_policy(docs, version_of(directory, files))
        except PolicyError as exc:
            findings.append(_from_error(exc))
    findings += lint_documents(docs)
    findings.sort(key=lambda f: (f.file, f.line or 0, -f.severity, f.code))
    return Report(tuple(findings), policy, len(files))


def _from_error(exc: PolicyError) -> Finding:
    message = f"{exc.field_path}: {exc.message}" if exc.field_path else exc.message
    return _finding(ERROR, "schema", exc.source, exc.line, message)


def _cross_file_errors(docs: list[PolicyDocument]) -> list[Finding]:
    out: list[Finding] = []
    principals: dict[str, PrincipalDecl] = {}
    for doc in docs:
        for p in doc.principals:
            first = principals.setdefault(p.name, p)
            if first is not p and first != p:
                out.append(_finding(ERROR, "duplicate-principal", p.source, p.line,
                                   f"principal {p.name!r} is already declared in "
                                   f"{first.source}:{first.line} with another identity"))
    rules: dict[str, RuleDecl] = {}
    for doc in docs:
        for r in doc.rules:
            first_rule = rules.setdefault(r.name, r)
            if first_rule is not r:
                out.append(_finding(ERROR, "duplicate-name", r.source, r.line,
                                   f"rule name {r.name!r} is already used in "
                                   f"{first_rule.source}:{first_rule.line}", rule=r.name))
            for key, entries in (("allow", r.allow), ("deny", r.deny)):
                for entry in entries:
                    named = entry != "*" and not entry.startswith("spiffe://")
                    if named and entry not in principals:
                        known = ", ".join(sorted(principals)) or "none declared"
                        out.append(_finding(ERROR, "unknown-principal", r.source, r.line,
                                           f"rule {r.name}: {key}: unknown principal {entry!r} "
                                           f"(declared: {known})", rule=r.name))
    return out


def lint_documents(docs: Iterable[PolicyDocument]) -> list[Finding]:
    docs = list(docs)
    principals = {p.name: p for d in docs for p in d.principals}
    rules = [r for d in docs for r in d.rules]
    out: list[Finding] = []
    for rule in rules:
        out += _rule_warnings(rule)
    by_host: dict[str, list[RuleDecl]] = {}
    for rule in rules:
        for host in rule.hosts:
            by_host.setdefault(host, []).append(rule)
    seen: set[tuple[str, str]] = set()
    for host_rules in by_host.values():
        for i, a in enumerate(host_rules):
            for b in host_rules[i + 1:]:
                if (a.name, b.name) in seen:
                    continue
                finding = _pair(a, b, principals)
                if finding is not None:
                    seen.add((a.name, b.name))
                    out.append(finding)
    return out


def _warn(rule: RuleDecl, code: str, message: str) -> Finding:
    return _finding(WARNING, code, rule.source, rule.line, f"rule {rule.name}: {message}",
                    rule=rule.name)


def _rule_warnings(rule: RuleDecl) -> list[Finding]:
    out = []
    writes = sorted(rule.methods & WRITE_METHODS) if rule.methods else ["any method"]
    broad = [e for e in rule.allow if e == "*" or _whole_trust_domain(e)]
    if broad and writes:
        out.append(_warn(rule, "dangerous-wildcard",
                         f"allows {broad[0]!r} to {', '.join(writes)} (any workload may write)"))
    path = rule.path
    if rule.allow and ((path.kind == "prefix" and path.value == "/")
                       or (path.kind == "regex" and path.value in _ALL_PATH_REGEXES)):
        out.append(_warn(rule, "allow-all-path",
                         f"allows every path of {', '.join(rule.hosts)} "
                         "(prefer the routes the callers need)"))
    if path.kind == "regex":
        bucket = regex_bucket(path.value)
        body = path.value.lstrip("^")
        if "|" not in body and body[:1].isalnum():
            out.append(_warn(rule, "unreachable-rule",
                             f"path_regex {path.value!r} can never match: request paths start "
                             "with '/'"))
        elif not bucket:
            out.append(_warn(rule, "unindexed-regex",
                             f"path_regex {path.value!r} has no literal leading segment "
                             "(e.g. '^/v1/...'): it is tried on every request for its host"))
    else:
        probe = path.value.replace("{", "x").replace("}", "x")
        if normalize_path(probe) != probe:
            out.append(_warn(rule, "unreachable-rule",
                             f"{path.kind} {path.value!r} contains characters a request path "
                             "cannot have after normalization"))
    if ";" in path.value and rule.allow:
        out.append(_warn(rule, "path-parameters",
                         f"{path.kind} {path.value!r} expects ';' path parameters: such a request "
                         "is allowed only if the same path without them is allowed too"))
    cond = rule.condition
    if cond is not None and not cond.program.variables():
        result = cond.evaluate({})
        if result is False:
            out.append(_warn(rule, "unreachable-rule", f"when {rule.when!r} is always false"))
        elif result is True:
            out.append(_warn(rule, "constant-condition", f"when {rule.when!r} is always true"))
    return out


def _whole_trust_domain(entry: str) -> bool:
    if not entry.startswith("spiffe://"):
        return False
    pattern = SpiffePattern.parse(entry)
    return pattern.open_ended and all(s == "*" for s in pattern.segments)


def _filters(rule: RuleDecl) -> tuple[object, ...]:
    return (frozenset(rule.headers), rule.when)


def _pair(a: RuleDecl, b: RuleDecl, principals: Mapping[str, PrincipalDecl]) -> Finding | None:
    if (a.methods == b.methods and a.path == b.path and _filters(a) == _filters(b)
            and a.mode == b.mode and set(a.allow) == set(b.allow) and set(a.deny) == set(b.deny)):
        return _warn(b, "duplicate-rule", f"duplicates rule {a.name} ({a.source}:{a.line})")
    for deny, allow in ((a, b), (b, a)):
        if _shadows(deny, allow, principals):
            return _warn(allow, "shadowed-rule",
                         f"can never allow: enforce rule {deny.name} ({deny.source}:{deny.line}) "
                         "denies all its callers on every request it matches")
    return None


def _shadows(deny: RuleDecl, allow: RuleDecl, principals: Mapping[str, PrincipalDecl]) -> bool:
    if deny.mode != "enforce" or not deny.deny or not allow.allow or deny.headers or deny.when:
        return False
    if deny.methods and (not allow.methods or not allow.methods <= deny.methods):
        return False
    if not _covers(deny.path.kind, deny.path.value, allow):
        return False
    return all(_denied(entry, deny.deny, principals) for entry in allow.allow)


def _covers(kind: str, value: str, rule: RuleDecl) -> bool:
    """Every path `rule` can match is matched by the (exact/prefix) path `kind value`."""
    path = rule.path
    if kind == "exact":
        return path.kind == "exact" and path.value == value
    if kind != "prefix":
        return False
    if path.kind == "regex":
        literal = regex_bucket(path.value)[:-1]
        if not literal and not regex_bucket(path.value):
            return value == "/"
    elif path.kind in ("template", "template_prefix"):
        head = path.value.split("/{", 1)[0]
        literal = head or "/"
    else:
        literal = path.value
    return value in ("/", literal) or literal.startswith(value + "/")


def _denied(entry: str, deny: tuple[str, ...], principals: Mapping[str, PrincipalDecl]) -> bool:
    if "*" in deny or entry in deny:
        return True
    if entry == "*":
        return False
    spiffe = _spiffe_of(entry, principals)
    if not spiffe or not SpiffePattern.parse(spiffe).is_exact:
        return False
    sid = parse_spiffe_id(spiffe)
    for d in deny:
        target = _spiffe_of(d, principals)
        if target and SpiffePattern.parse(target).matches(sid):
            return True
    return False


def _spiffe_of(entry: str, principals: Mapping[str, PrincipalDecl]) -> str:
    if entry.startswith("spiffe://"):
        return entry
    decl = principals.get(entry)
    return decl.spiffe if decl is not None else ""


def format_text(report: Report) -> str:
    lines = [finding_text(f) for f in report.findings]
    if report.errors:
        lines.append(f"FAILED: {report.errors} error(s), {report.warnings} warning(s) "
                     f"in {report.files} file(s)")
    else:
        p = report.policy
        assert p is not None
        lines.append(f"OK: {report.files} file(s), {len(p.rules)} rules, {len(p.principals)} "
                     f"principals, {len(p.hosts)} hosts, version {p.version}; "
                     f"{report.warnings} warning(s)")
    return "\n".join(lines)


def format_json(report: Report) -> str:
    return json.dumps({
        "ok": report.errors == 0,
        "version": report.policy.version if report.policy is not None else None,
        "errors": report.errors,
        "warnings": report.warnings,
        "findings": [finding_dict(f) for f in report.findings],
    }, indent=2)
