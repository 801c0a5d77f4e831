"""`extauthz validate`: every error with file:line, and each warning on a minimal policy."""

import json
from pathlib import Path

import pytest

from extauthz.cli.main import main
from extauthz.tools.lint import finding_text, format_json, format_text, validate_directory

HEAD = """apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: checkout
    spiffe: spiffe://prod.example/ns/shop/sa/checkout
  - name: shop
    spiffe: spiffe://prod.example/ns/shop/sa/*
rules:
"""


def write(d: Path, name: str, text: str) -> Path:
    (d / name).write_text(text)
    return d


def codes(d: Path) -> list[tuple[str, str, int | None, str]]:
    return [(f.severity.label, f.code, f.line, f.subject) for f in validate_directory(d).findings]


def test_errors_in_several_files_are_all_reported_with_lines(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD + "  - name: r\n    path: /x\n    methods: [FETCH]\n    allow: [checkout]\n")
    write(tmp_path, "b.yaml", "apiVersion: extauthz/v1\nrules: [\n")
    report = validate_directory(tmp_path)
    assert [(f.file, f.line, f.severity.label) for f in report.findings] == [
        ("a.yaml", 13, "error"), ("b.yaml", 3, "error")]
    assert finding_text(report.findings[0]) == (
        "a.yaml:13: error: rules[0].methods: unknown HTTP method 'FETCH' [schema]")
    assert report.policy is None


def test_unknown_principals_are_each_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD + "  - name: r\n    path: /x\n    allow: [ghost, checkout]\n"
          "  - name: s\n    path: /y\n    deny: [phantom]\n")
    found = validate_directory(tmp_path).findings
    assert [(f.code, f.line) for f in found] == [("unknown-principal", 11), ("unknown-principal", 14)]
    assert "unknown principal 'ghost' (declared: checkout, shop)" in found[0].message


def test_duplicate_rule_names_and_principals_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD + "  - name: r\n    path: /x\n    allow: [checkout]\n")
    write(tmp_path, "b.yaml", HEAD.replace("sa/checkout", "sa/other") + "  - name: r\n    path: /y\n    allow: [checkout]\n")
    assert {(f.file, f.code) for f in validate_directory(tmp_path).findings} == {
        ("b.yaml", "duplicate-principal"), ("b.yaml", "duplicate-name")}


@pytest.mark.parametrize(("rules", "expected"), [
    ("  - name: w\n    methods: [POST]\n    path: /x\n    allow: ['*']\n", ("dangerous-wildcard", "w")),
    ("  - name: w\n    path: /x\n    allow: ['spiffe://prod.example/**']\n", ("dangerous-wildcard", "w")),
    ("  - name: all\n    methods: [GET]\n    path_prefix: /\n    allow: [checkout]\n", ("allow-all-path", "all")),
    ("  - name: all\n    methods: [GET]\n    path_regex: /.*\n    allow: [checkout]\n", ("allow-all-path", "all")),
    ("  - name: a\n    path: /x\n    allow: [checkout]\n  - name: b\n    path: /x\n    allow: [checkout]\n",
     ("duplicate-rule", "b")),
    ("  - name: a\n    methods: [GET]\n    path_prefix: /v1/orders/{id}\n    allow: [checkout]\n"
     "  - name: d\n    path_prefix: /v1\n    deny: [shop]\n", ("shadowed-rule", "a")),
    ("  - name: a\n    path_regex: ^v1/x$\n    allow: [checkout]\n", ("unreachable-rule", "a")),
    ("  - name: a\n    path: /a b\n    allow: [checkout]\n", ("unreachable-rule", "a")),
    ("  - name: a\n    path: /x\n    allow: [checkout]\n    when: '1 > 2'\n", ("unreachable-rule", "a")),
    ("  - name: a\n    path: /x\n    allow: [checkout]\n    when: 'true'\n", ("constant-condition", "a")),
    ("  - name: a\n    path_regex: '[a-z/]+/report'\n    allow: [checkout]\n", ("unindexed-regex", "a")),
    ("  - name: a\n    path: /v1/items;v=2\n    allow: [checkout]\n", ("path-parameters", "a")),
])
def test_each_warning(tmp_path: Path, rules: str, expected: tuple[str, str]) -> None:
    write(tmp_path, "a.yaml", HEAD + rules)
    found = [(c, r) for sev, c, _, r in codes(tmp_path) if sev == "warning"]
    assert found == [expected]


def test_not_shadowed_when_the_deny_is_narrower_dry_run_or_filtered(tmp_path: Path) -> None:
    allow = "  - name: a\n    path_prefix: /v1\n    allow: [checkout]\n"
    for deny in ("  - name: d\n    path_prefix: /v1/admin\n    deny: [shop]\n",
                 "  - name: d\n    path_prefix: /v1\n    deny: [shop]\n    mode: dry-run\n",
                 "  - name: d\n    path_prefix: /v1\n    deny: [shop]\n    headers: {x-a: b}\n",
                 "  - name: d\n    methods: [GET]\n    path_prefix: /v1\n    deny: [shop]\n",
                 "  - name: d\n    path_prefix: /v1\n    deny: ['spiffe://prod.example/ns/other/sa/*']\n"):
        write(tmp_path, "a.yaml", HEAD + allow + deny)
        assert codes(tmp_path) == [], deny


def test_examples_are_clean(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    report = validate_directory(repo / "policy")
    assert (report.errors, report.warnings) == (0, 0), format_text(report)


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a.yaml", HEAD + "  - name: w\n    methods: [POST]\n    path: /x\n    allow: ['*']\n")
    assert main(["validate", str(tmp_path)]) == 0
    assert main(["validate", str(tmp_path), "--strict"]) == 1
    capsys.readouterr()
    assert main(["validate", str(tmp_path), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["warnings"], out["findings"][0]["code"]) == (True, 1, "dangerous-wildcard")
    write(tmp_path, "a.yaml", "apiVersion: extauthz/v1\n")
    assert main(["validate", str(tmp_path)]) == 1
    assert main(["validate", str(tmp_path / "missing")]) == 1
    assert json.loads(format_json(validate_directory(tmp_path)))["ok"] is False
