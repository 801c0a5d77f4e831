"""The grown v1 format: templates, regexes, headers, `when`, JWT principals, lines, schema."""

import json
from pathlib import Path

import pytest
import yaml

from extauthz.policy.document import PolicyError, load_yaml, parse_document
from extauthz.sources.policy_store import load_policy

REPO = Path(__file__).resolve().parents[2]
HEAD = "apiVersion: extauthz/v1\nowner: t\nservice: s\nhosts: [orders.mesh.local]\n"
CHECKOUT = "principals:\n  - name: checkout\n    spiffe: spiffe://prod.example/ns/shop/sa/checkout\n"


def parse(text: str) -> object:
    return parse_document(load_yaml(text, "f.yaml"), "f.yaml")


def rule(body: str) -> str:
    return HEAD + CHECKOUT + "rules:\n  - name: r\n    allow: [checkout]\n" + body


@pytest.mark.parametrize(("text", "message"), [
    (rule("    path: /v1/{id}.json\n"),
     "f.yaml: rules[0].path: template segment '{id}.json' must be a whole segment '{name}' "
     "(lowercase name); use path_regex for more (line 11)"),
    (rule("    path: /v1/{id}/{id}\n"), "f.yaml: rules[0].path: template variable names must be unique (line 11)"),
    (rule("    path_regex: '^/(a)\\1$'\n"), "invalid RE2 regular expression"),
    (rule("    path: /x\n    path_regex: ^/x$\n"), "exactly one of 'path' or 'path_prefix' is required"),
    (rule("    path: /x\n    headers: {X-Tenant: a}\n"), "f.yaml: rules[0].headers.X-Tenant: header names must be lowercase"),
    (rule("    path: /x\n    headers: {x-a: {regex: '(?=x)'}}\n"), "rules[0].headers.x-a.regex: invalid RE2"),
    (rule("    path: /x\n    headers: {x-a: {exact: a, present: true}}\n"), "needs exactly one of 'exact', 'present' or 'regex'"),
    (rule("    path: /x\n    headers: {host: a}\n"), "use the rule's methods/path/hosts instead"),
    (rule("    path: /x\n    when: 'size(headers) > 0'\n"), "rules[0].when: headers may only be read by a literal name"),
    (rule("    path: /x\n    allow: [checkout]\n"), "f.yaml:12: invalid YAML: duplicate key 'allow'"),
    (HEAD + "principals:\n  - name: p\n    jwt: {issuer: https://idp}\n",
     "principals[0].jwt.subject: a jwt principal needs 'subject' or 'claims'"),
    (HEAD + "principals:\n  - name: p\n    jwt: {issuer: i, subject: s}\n    spiffe: spiffe://a/b\n",
     "exactly one of 'spiffe' or 'jwt' is required"),
    (HEAD + "principals:\n  - name: p\n    jwt: {issuer: i, claims: {sub: x}}\n", "use 'issuer'/'subject'"),
    (HEAD + "principals:\n  - name: p\n    jwt: {issuer: i, claims: {groups: [a]}}\n",
     "claim 'groups': value must be a string, number or bool"),
    (HEAD.replace("[orders.mesh.local]", "['orders:http']"), "invalid port in host 'orders:http'"),
])
def test_bad_new_fields_are_rejected_with_file_field_and_line(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse(text)
    assert message in str(err.value)


def test_errors_carry_the_line_of_the_offending_key() -> None:
    text = rule("    path: /x\n    methods: [FETCH]\n")
    with pytest.raises(PolicyError) as err:
        parse(text)
    assert (err.value.source, err.value.line, err.value.field_path) == ("f.yaml", 12, "rules[0].methods")
    assert text.splitlines()[11].strip().startswith("methods:")


def test_a_missing_field_points_at_its_mapping() -> None:
    with pytest.raises(PolicyError) as err:
        parse(HEAD + CHECKOUT + "rules:\n  - name: r\n    path: /x\n")
    assert (err.value.line, err.value.field_path) == (9, "rules[0].allow")


def test_new_fields_parse() -> None:
    doc = parse(rule("    path: /v1/orders/{id}\n    headers:\n      x-a: v\n      x-b: {present: false}\n"
                     "      x-c: {regex: 'v[0-9]'}\n    when: 'claims.tier == \"gold\"'\n"))
    r = doc.rules[0]  # type: ignore[attr-defined]
    assert (r.path.kind, r.path.segments) == ("template", ("v1", "orders", ""))
    assert [(h.name, h.kind, h.value) for h in r.headers] == [
        ("x-a", "exact", "v"), ("x-b", "absent", ""), ("x-c", "regex", "v[0-9]")]
    assert r.condition.claims == ("tier",) and r.line == 9


def test_hosts_are_lowercased_and_ports_dropped_once() -> None:
    doc = parse(HEAD.replace("[orders.mesh.local]", "[Orders.Mesh.Local, 'orders.mesh.local:8443']"))
    assert doc.hosts == ("orders.mesh.local",)  # type: ignore[attr-defined]


def test_v1_files_without_new_fields_still_load() -> None:
    for directory in (REPO / "extauthz" / "defaults" / "demo-policy",):
        assert load_policy(directory).rules


def test_shipped_examples_cover_the_format() -> None:
    policy = load_policy(REPO / "policy")
    kinds = {r.decl.path.kind for r in policy.rules}
    assert {"exact", "prefix", "template", "regex"} <= kinds
    assert any(r.dry_run for r in policy.rules) and any(r.decl.when for r in policy.rules)
    assert any(r.decl.headers for r in policy.rules) and any(r.deny for r in policy.rules)
    assert any(p.jwt is not None for p in policy.principals.values())


def _policy_files() -> list[Path]:
    dirs = [REPO / "policy", REPO / "extauthz" / "defaults" / "demo-policy"]
    return [p for d in dirs for p in sorted(d.glob("*.yaml")) if not p.name.endswith("_test.yaml")]


@pytest.mark.parametrize("path", _policy_files(), ids=lambda p: p.name)
def test_every_example_validates_against_the_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "policy" / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_the_schema_rejects_what_the_loader_rejects() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "policy" / "schema.json").read_text())
    good = yaml.safe_load(rule("    path: /x\n"))
    jsonschema.validate(good, schema)
    for bad in ({**good, "alow": 1}, {**good, "apiVersion": "v2"},
                {**good, "rules": [{"name": "r", "allow": ["checkout"]}]},
                {**good, "rules": [{"name": "r", "path": "/x"}]},
                {**good, "rules": [{"name": "r", "path": "/x", "allow": "x", "mode": "audit"}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
