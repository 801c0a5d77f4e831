"""One fixture per policy error, asserted by its exact message (file and field named)."""

from pathlib import Path

import pytest

from extauthz.policy.document import PolicyError, parse_document
from extauthz.sources.policy_store import PolicyLoadError, load_policy

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"

GOOD = {
    "apiVersion": "extauthz/v1",
    "owner": "team-a",
    "service": "orders",
    "hosts": ["orders.mesh.local"],
    "principals": [{"name": "checkout", "spiffe": "spiffe://prod.example/ns/shop/sa/checkout"}],
    "rules": [{"name": "read", "methods": ["GET"], "path_prefix": "/v1/orders", "allow": ["checkout"]}],
}


def _with(**changes: object) -> dict[str, object]:
    doc = {**GOOD, **changes}
    return {k: v for k, v in doc.items() if v is not None}


def _rule(**changes: object) -> dict[str, object]:
    rule = {**GOOD["rules"][0], **changes}  # type: ignore[index]
    return _with(rules=[{k: v for k, v in rule.items() if v is not None}])


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "f.yaml: a policy file must be a YAML mapping"),
        (_with(apiVersion="v2"), "f.yaml: apiVersion: must be 'extauthz/v1', got 'v2'"),
        (_with(owner=None), "f.yaml: owner: is required"),
        (_with(hosts=[]), "f.yaml: hosts: must name at least one host"),
        (_with(alow=["x"]), "f.yaml: alow: unknown field (allowed: apiVersion, connections, hosts, owner, principals, rules, service)"),
        (_with(principals=[{"name": "Bad Name", "spiffe": "spiffe://a/b"}]),
         "f.yaml: principals[0].name: must be lowercase letters, digits, '.', '_' or '-'"),
        (_with(principals=[{"name": "x", "spiffe": "spiffe://Prod/b"}]),
         "f.yaml: principals[0].spiffe: invalid SPIFFE ID or pattern 'spiffe://Prod/b': trust domain has a character outside [a-z0-9-._]: 'P'"),
        (_rule(alow=["checkout"]),
         "f.yaml: rules[0].alow: unknown field (allowed: allow, deny, headers, hosts, limit, methods, mode, name, path, path_prefix, path_regex, when)"),
        (_rule(methods=["FETCH"]), "f.yaml: rules[0].methods: unknown HTTP method 'FETCH'"),
        (_rule(path="/v1/orders"), "f.yaml: rules[0].path: exactly one of 'path' or 'path_prefix' is required (or 'path_regex' for an RE2 regular expression)"),
        (_rule(path_prefix="/v1/../admin"), "f.yaml: rules[0].path_prefix: must be a normalized path (no '.', '..' or '//' segments)"),
        (_rule(path_prefix="/v1%2Forders"), "f.yaml: rules[0].path_prefix: must not contain '%', '\\', '?' or '#'"),
        (_rule(path_prefix="v1"), "f.yaml: rules[0].path_prefix: must start with '/'"),
        (_rule(allow=None), "f.yaml: rules[0].allow: a rule needs 'allow' or 'deny' (default is deny)"),
        (_rule(allow=["Not A Name"]), "f.yaml: rules[0].allow: 'Not A Name' is neither a principal name nor a SPIFFE ID"),
        (_rule(mode="audit"), "f.yaml: rules[0].mode: must be 'enforce' or 'dry-run'"),
        (_rule(limit={"rate": 0}), "f.yaml: rules[0].limit.rate: must be a positive integer"),
        (_rule(limit={"rate": 5, "period": "soon"}), "f.yaml: rules[0].limit.period: must be a duration like 1s, 500ms, 1m or 1h"),
    ],
)
def test_bad_policy_is_rejected_naming_file_and_field(doc: object, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_document(doc, "f.yaml")
    assert str(err.value) == message


def test_spiffe_pattern_wildcard_must_be_a_whole_segment() -> None:
    with pytest.raises(PolicyError, match="'\\*' must stand for a whole path segment"):
        parse_document(_rule(allow=["spiffe://prod.example/ns/shop*"]), "f.yaml")


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="does not exist or is not a directory"):
        load_policy(tmp_path / "nope")


def test_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="no policy files"):
        load_policy(tmp_path)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: extauthz/v1\nrules: [\n  - x: {\n")
    with pytest.raises(PolicyError, match=r"^a\.yaml:\d+: invalid YAML"):
        load_policy(tmp_path)


def test_unknown_principal_name_in_rule_is_an_error(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(_rule(allow=["ghost"])))
    with pytest.raises(PolicyError, match="unknown principal 'ghost'"):
        load_policy(tmp_path)


def test_duplicate_rule_names_across_files_are_an_error(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(GOOD))
    other = _with(principals=[])
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(PolicyError, match="rule name 'read' is already used in a.yaml"):
        load_policy(tmp_path)


def test_hidden_entries_and_test_files_are_not_policies(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "b.yaml").write_text("not: [valid")
    (tmp_path / "a_test.yaml").write_text("cases: []")
    assert [r.name for r in load_policy(tmp_path).rules] == ["read"]


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(GOOD))
    first = load_policy(tmp_path).version
    assert load_policy(tmp_path).version == first
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(GOOD) + "\n# comment\n")
    assert load_policy(tmp_path).version != first


def test_shipped_example_policies_load() -> None:
    policy = load_policy(REPO_POLICY)
    assert {"orders-read", "stock-read", "stock-audit"} <= {r.name for r in policy.rules}
