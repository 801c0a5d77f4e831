"""The doctor's three outputs: a text report for people, JSON for scripts, SARIF 2.1.0 for CI
code scanning (GitHub, GitLab and others show SARIF results as annotations on the file).

All three are deterministic: same findings, same bytes. SARIF results point at a line of the
input when it is a file: the JSONPath of a finding is looked up in the YAML/JSON node tree,
falling back to the nearest enclosing node that exists in the text (a TypedStruct-wrapped or
defaulted field has no line of its own).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

import yaml

from extauthz.tools.doctor.catalog import CHECKS
from extauthz.tools.findings import Finding, Severity, count_by_severity

DOCS_URL = "https://github.com/extauthz/extauthz/blob/main/docs/doctor.md"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


def at_or_above(findings: Iterable[Finding], threshold: Severity) -> list[Finding]:
    return [f for f in findings if f.severity >= threshold]


def as_dict(f: Finding) -> dict[str, str]:
    c = CHECKS[f.code]
    return {
        "id": f.code,
        "severity": f.severity.label,
        "title": c.title,
        "path": f.path,
        "subject": f.subject,
        "detail": f.message,
        "why": c.why,
        "fix": c.fix,
    }


def render_json(
    findings: Sequence[Finding], *, config: str, policy: str | None, fail_on: Severity,
    read: str = "",
) -> str:
    doc = {
        "config": config,
        "read": read,
        "policy": policy,
        "fail_on": fail_on.label,
        "summary": count_by_severity(list(findings)),
        "findings": [as_dict(f) for f in findings],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def render_text(
    findings: Sequence[Finding], *, config: str, policy: str | None, fail_on: Severity,
    read: str = "",
) -> str:
    lines = [f"extauthz doctor: {config}" + (f" (policy: {policy})" if policy else "")]
    if read:
        lines.append(f"read: {read}")
    if not findings:
        lines.append("no findings")
        return "\n".join(lines) + "\n"
    for f in findings:
        c = CHECKS[f.code]
        lines += ["", f"{c.severity.label.upper():<8}{f.code}: {c.title}", f"  at:   {f.path}"]
        lines += [
            f"  what: {f.message}",
            f"  why:  {c.why}",
            f"  fix:  {c.fix}",
        ]
    counts = [
        f"{n} {s.label}{'s' if n != 1 else ''}"
        for s in sorted(Severity, reverse=True)
        if (n := sum(1 for f in findings if f.severity is s))
    ]
    failing = len(at_or_above(findings, fail_on))
    lines += ["", f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: "
              f"{', '.join(counts)}; {failing} at or above {fail_on.label}"]
    return "\n".join(lines) + "\n"


def render_sarif(
    findings: Sequence[Finding], *, config: str, source_text: str | None, version: str,
) -> str:
    """SARIF 2.1.0: one run, every check as a rule (so a rule's help is shown even for
    results from an older run), each finding a result located in the input file."""
    rules = [
        {
            "id": c.id,
            "name": c.id.replace(".", "_"),
            "shortDescription": {"text": c.title},
            "fullDescription": {"text": c.why},
            "help": {"text": f"{c.why}\n\nFix: {c.fix}",
                     "markdown": f"{c.why}\n\n**Fix:** {c.fix}"},
            "helpUri": f"{DOCS_URL}#{c.id.replace('.', '')}",
            "defaultConfiguration": {"level": c.severity.sarif_level},
            "properties": {"tags": ["security", "envoy", "ext_authz"]},
        }
        for c in sorted(CHECKS.values(), key=lambda c: c.id)
    ]
    index = {r["id"]: i for i, r in enumerate(rules)}
    lines = line_index(source_text) if source_text is not None else {}
    results = []
    for f in findings:
        location: dict[str, object] = {"artifactLocation": {"uri": config}}
        line = _line_of(f.path, lines)
        if line is not None:
            location["region"] = {"startLine": line}
        results.append({
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": f.severity.sarif_level,
            "message": {"text": f.message},
            "locations": [{
                "physicalLocation": location,
                "logicalLocations": [{"fullyQualifiedName": f.path, "kind": "member"}],
            }],
            "partialFingerprints": {
                "doctorFinding/v1": hashlib.sha256(
                    f"{f.code}\0{f.path}\0{f.message}".encode()).hexdigest()[:32],
            },
        })
    doc = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "extauthz doctor",
                "informationUri": DOCS_URL,
                "version": version,
                "rules": rules,
            }},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def line_index(text: str) -> dict[str, int]:
    """JSONPath (as the doctor writes them) -> 1-based line, for every node of a YAML/JSON
    text. Unparseable text gives an empty index (results then carry no line)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "$")] if root is not None else []
    while stack:
        node, path = stack.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                name = str(key.value)
                snake = _CAMEL.sub(lambda m: "_" + m.group(1).lower(), name)
                child = f"{path}.{snake}" if _IDENT.match(snake) else f'{path}["{name}"]'
                out.setdefault(child, key.start_mark.line + 1)
                if not _IDENT.match(snake):
                    stack.append((value, child))
                else:
                    stack.append((value, child))
                    stack.append((value, f'{path}["{name}"]'))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                stack.append((item, f"{path}[{i}]"))
    return out


def _line_of(path: str, lines: dict[str, int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    return lines.get("$")
