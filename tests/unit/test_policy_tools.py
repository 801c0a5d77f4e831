"""`extauthz check --explain` and `extauthz test`: traces, readable failures, JUnit XML."""

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from extauthz.cli.main import main
from extauthz.sources.policy_store import load_policy
from extauthz.tools.explain import CallerError, Probe, caller_identity, explain, format_explanation
from extauthz.tools.policy_tests import format_results, run_directory

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(REPO / "policy", d)
    return d


def test_shipped_policy_tests_pass() -> None:
    files = run_directory(load_policy(REPO / "policy"), REPO / "policy")
    assert len(files) >= 4
    failures = [r for f in files for r in f.results if not r.passed]
    assert failures == [], format_results(files)


def test_explain_uses_the_matchers_decision_and_says_why(policy_dir: Path) -> None:
    policy = load_policy(policy_dir)
    exp = explain(policy, Probe("checkout", "PATCH", "/v1/orders/42/items/7", "orders.mesh.local",
                                {"x-tenant-id": "ACME!"}))
    by_rule = {t.rule.name: t for t in exp.rules}
    assert exp.decision.reason.value == "condition_not_met"
    assert exp.decision.rule == "orders-item-update"
    assert by_rule["orders-item-update"].route and by_rule["orders-item-update"].verdict == "not applicable"
    assert "header x-tenant-id must be ~ '[a-z0-9-]{1,40}', got 'ACME!'" in by_rule["orders-item-update"].notes
    assert by_rule["orders-read"].notes == ("method PATCH not in [GET, HEAD]",)
    text = format_explanation(exp, policy)
    assert ("decision: DENY 403 condition_not_met rule=orders-item-update (rule "
            "orders-item-update: header x-tenant-id does not match ~ '[a-z0-9-]{1,40}')") in text
    assert "(orders.yaml:" in text


def test_explain_reports_pre_rule_denials_and_unknown_hosts(policy_dir: Path) -> None:
    policy = load_policy(policy_dir)
    amb = explain(policy, Probe("checkout", "GET", "/v1/%2e%2e/%2e%2e/x", "orders.mesh.local"))
    assert amb.rules == () and amb.preface[0].startswith("denied before any rule")
    nohost = explain(policy, Probe("checkout", "GET", "/x", "nowhere.mesh.local"))
    assert "no rule names host 'nowhere.mesh.local'" in nohost.preface[0]
    dots = explain(policy, Probe("checkout", "GET", "/v1/x/../orders/1", "orders.mesh.local"))
    assert "normalizes to '/v1/orders/1'" in dots.preface[0] and dots.decision.allowed


def test_caller_must_be_concrete(policy_dir: Path) -> None:
    policy = load_policy(policy_dir)
    for bad in ("shop-workloads", "not-declared", "spiffe://Bad/x"):
        with pytest.raises(CallerError):
            caller_identity(policy, bad)
    with pytest.raises(CallerError, match="needs an issuer"):
        caller_identity(policy, "alice", {"sub": "alice"})
    assert caller_identity(policy, "checkout").principal == CHECKOUT


def test_check_cli_exit_codes_and_json(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["check", "--policy", str(policy_dir), "--host", "orders.mesh.local"]
    assert main([*base, "--principal", CHECKOUT, "--method", "GET", "--path", "/v1/orders/1"]) == 0
    assert capsys.readouterr().out.strip() == "ALLOW 200 allowed rule=orders-read"
    assert main([*base, "--principal", "billing", "--method", "POST", "--path", "/v1/orders"]) == 1
    capsys.readouterr()
    assert main([*base, "--principal", "checkout", "--method", "GET", "--path", "/v1/orders/1",
                 "--header", "X-HTTP-Method-Override=DELETE", "--format", "json"]) == 1
    over = json.loads(capsys.readouterr().out)
    assert (over["allowed"], over["reason"]) == (False, "method_override")
    assert main([*base, "--principal", "support-agents", "--method", "POST", "--path",
                 "/v1/orders/9/cancel", "--jwt-claims", '{"sub": "a", "amr": ["mfa"]}',
                 "--format", "json", "--explain"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["rule"], data["reason"]) == ("orders-cancel", "allowed")
    assert any(t["rule"] == "orders-cancel" and t["route_matched"] for t in data["trace"])
    assert main([*base, "--principal", "checkout", "--method", "GET", "--path", "/x",
                 "--header", "novalue"]) == 2
    assert main(["check", "--policy", str(policy_dir / "nope"), "--principal", "x", "--method",
                 "GET", "--path", "/"]) == 2


FAILING = """cases:
  - name: passes
    principal: checkout
    method: GET
    path: /v1/orders/1
    expect: allow
  - name: wrong on purpose
    principal: billing
    method: POST
    path: /v1/orders
    expect: {decision: allow, rule: orders-create}
  - name: bad caller
    principal: shop-workloads
    method: GET
    path: /v1/orders/1
    expect: allow
"""


def test_test_runner_reports_failures_readably_with_junit(policy_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "extra_test.yaml").write_text(FAILING.replace("cases:", "host: orders.mesh.local\ncases:"))
    junit = tmp_path / "junit.xml"
    assert main(["test", str(policy_dir), "--junit", str(junit), "--explain"]) == 1
    out = capsys.readouterr().out
    assert "FAIL extra_test.yaml:8: wrong on purpose" in out
    assert "expected: allow rule=orders-create" in out
    assert "got:      DENY 403 principal_not_allowed rule=orders-create" in out
    assert "FAIL extra_test.yaml:13: bad caller" in out and "is the pattern" in out
    assert "+ orders-create" in out  # the explanation of the failing case
    assert out.strip().endswith("passed, 2 failed")
    suite = next(s for s in ET.parse(junit).getroot() if s.get("name") == "extra_test.yaml")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    failure = suite.find("testcase[@name='wrong on purpose']/failure")
    assert failure is not None and "expected allow" in (failure.get("message") or "")


@pytest.mark.parametrize(("text", "message"), [
    ("cases: []\n", "cases: must be a non-empty list"),
    ("cases:\n  - {name: a, principal: checkout, method: GET, path: /, expect: maybe}\n", "must be 'allow' or 'deny'"),
    ("cases:\n  - {name: a, principal: checkout, method: GET, path: /, expect: {reason: nope}}\n", "unknown reason 'nope'"),
    ("cases:\n  - {name: a, principal: checkout, method: GET, path: /, expect: allow, extra: 1}\n", "unknown field"),
    ("cases:\n  - {name: a, principal: checkout, method: GET, path: /, expect: allow, time: soon}\n", "ISO 8601"),
])
def test_bad_test_files_are_errors(policy_dir: Path, text: str, message: str) -> None:
    (policy_dir / "orders_test.yaml").write_text(text)
    files = run_directory(load_policy(policy_dir), policy_dir)
    errors = [f.error for f in files if f.error]
    assert len(errors) == 1 and message in errors[0] and "orders_test.yaml" in errors[0]


def test_no_test_files_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(REPO / "policy" / "orders.yaml", tmp_path / "orders.yaml")
    assert main(["test", str(tmp_path)]) == 1
    assert "no policy test files" in capsys.readouterr().out
