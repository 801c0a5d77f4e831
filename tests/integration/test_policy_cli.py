"""`python -m extauthz validate | check | test` as real processes, as CI and authors run them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(REPO / "policy", d)
    return d


def test_validate_a_broken_directory_names_every_file_and_line(policy_dir: Path) -> None:
    (policy_dir / "bad.yaml").write_text(
        "apiVersion: extauthz/v1\nowner: t\nservice: s\nhosts: [bad.mesh.local]\nrules:\n"
        "  - name: r\n    path: /x\n    allow: [ghost]\n"
        "  - name: w\n    methods: [DELETE]\n    path_prefix: /\n    allow: ['*']\n")
    (policy_dir / "worse.yaml").write_text("apiVersion: extauthz/v1\nrules: [\n")
    out = run("validate", str(policy_dir))
    assert out.returncode == 1, out.stdout
    lines = out.stdout.splitlines()
    assert "bad.yaml:6: error: rule r: allow: unknown principal 'ghost'" in lines[0]
    assert any(line.startswith("bad.yaml:9: warning: rule w: allows '*' to DELETE") for line in lines)
    assert any(line.startswith("bad.yaml:9: warning: rule w: allows every path") for line in lines)
    assert any(line.startswith("worse.yaml:3: error: invalid YAML") for line in lines)
    assert lines[-1].startswith("FAILED: 2 error(s), 2 warning(s)")


def test_validate_json_on_the_examples() -> None:
    out = run("validate", "policy", "--format", "json")
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert (report["ok"], report["errors"], report["findings"]) == (True, 0, [])


def test_check_prints_the_decision_and_exit_code() -> None:
    ok = run("check", "--policy", "policy", "--host", "orders.mesh.local", "--principal", CHECKOUT,
             "--method", "GET", "--path", "/v1/orders/42")
    assert (ok.returncode, ok.stdout.strip()) == (0, "ALLOW 200 allowed rule=orders-read")
    no = run("check", "--policy", "policy", "--host", "payments.mesh.local",
             "--principal", "checkout", "--method", "GET", "--path", "/v1/admin/x", "--explain")
    assert no.returncode == 1
    assert "+ payments-admin-no-workloads  denies the caller" in no.stdout
    assert no.stdout.strip().endswith(
        "decision: DENY 403 denied_by_rule rule=payments-admin-no-workloads "
        "(denied by rule payments-admin-no-workloads)")
    timed = run("check", "--policy", "policy", "--host", "payments.mesh.local",
                "--principal", "payments-oncall", "--jwt-claims", '{"sub": "alice"}',
                "--time", "2025-01-07T10:00:00Z", "--method", "POST", "--path", "/v1/admin/replay")
    assert (timed.returncode, timed.stdout.strip()) == (0, "ALLOW 200 allowed rule=payments-admin")
    bad = run("check", "--policy", "policy", "--principal", "nobody", "--method", "GET",
              "--path", "/", "--host", "orders.mesh.local")
    assert bad.returncode == 2 and "neither a declared principal name nor a valid SPIFFE ID" in bad.stderr


def test_test_command_passes_on_examples_and_writes_junit(tmp_path: Path) -> None:
    junit = tmp_path / "policy-tests.xml"
    out = run("test", "policy", "--junit", str(junit))
    assert out.returncode == 0, out.stdout
    assert out.stdout.strip().splitlines()[-1].endswith(" passed, 0 failed")
    root = ET.parse(junit).getroot()
    assert sum(int(s.get("tests", "0")) for s in root) >= 40
    assert all(s.get("failures") == "0" and s.get("errors") == "0" for s in root)


def test_test_command_fails_on_a_wrong_expectation(policy_dir: Path) -> None:
    text = (policy_dir / "orders_test.yaml").read_text()
    (policy_dir / "orders_test.yaml").write_text(
        text.replace("expect: {decision: deny, reason: method_override}", "expect: allow"))
    out = run("test", str(policy_dir))
    assert out.returncode == 1
    assert "FAIL orders_test.yaml:" in out.stdout and "a method override header" in out.stdout
    assert "got:      DENY 403 method_override" in out.stdout


def test_test_command_refuses_a_broken_policy(policy_dir: Path) -> None:
    (policy_dir / "orders.yaml").write_text("apiVersion: extauthz/v1\n")
    out = run("test", str(policy_dir))
    assert out.returncode == 2 and "orders.yaml: owner: is required" in out.stderr
