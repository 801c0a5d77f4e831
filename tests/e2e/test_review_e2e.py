"""Access review of decision logs written by a real mesh: Envoy + `extauthz serve
--decision-log FILE` + upstream, real mTLS SVIDs, the demo policy in two versions.

Version 1 is the demo policy; version 2 adds a dry-run rule that would deny billing's reads.
Both stacks append to one decision log, to which a malformed and a truncated line are added;
the review must attribute every decision to its version, and its suggested patch must apply
with `patch -p1` and pass `extauthz validate`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from extauthz.cli.main import main
from extauthz.devstack.certs import Credential
from extauthz.devstack.demo import WORKLOADS
from extauthz.devstack.stack import DEFAULT_POLICY_DIR, DevStack, call
from extauthz.sources.policy_store import load_policy

pytestmark = pytest.mark.e2e

LOCKDOWN = """\
  - name: lockdown
    methods: [GET]
    path_prefix: /v1/orders
    deny: [billing]
    mode: dry-run
"""
CALLS = [
    ("checkout", "GET", "orders", "/v1/orders/42", 200),
    ("checkout", "GET", "orders", "/v1/orders/7", 200),
    ("checkout", "POST", "orders", "/v1/orders", 200),
    ("checkout", "DELETE", "orders", "/v1/orders/42", 403),
    ("billing", "GET", "orders", "/v1/orders/42", 200),
    ("orders", "POST", "billing", "/v1/charges", 200),
    ("checkout", "POST", "billing", "/v1/charges", 403),
    ("checkout", "GET", "inventory", "/v1/stock/sku-1", 200),
    ("legacy-cron", "GET", "orders", "/v1/orders", 401),
]


def drive(policy: Path, log: Path, workdir: Path) -> None:
    with DevStack(policy, serve_args=["--decision-log", str(log)], workdir=workdir) as stack:
        creds: dict[str, Credential] = {n: stack.issue_svid(s) for n, s in WORKLOADS.items()}
        creds["legacy-cron"] = stack.ca.issue_dns_only("legacy-cron.demo.local")
        for caller, method, host, path, want in CALLS:
            got = call(stack, creds[caller], method, f"{host}.demo.local", path).status
            assert got == want, (caller, method, path, got, stack.logs())
    assert stack.exit_codes == {"envoy": 0, "extauthz": 0}, stack.logs()


@pytest.fixture(scope="module")
def mesh_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("review")
    v1, v2 = root / "v1", root / "v2"
    shutil.copytree(DEFAULT_POLICY_DIR, v1)
    shutil.copytree(DEFAULT_POLICY_DIR, v2)
    orders = v2 / "orders.yaml"
    orders.write_text(orders.read_text() + LOCKDOWN)
    log = root / "decisions.log"
    drive(v1, log, root / "stack1")
    drive(v2, log, root / "stack2")
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * len(CALLS), lines  # one line per decision, flushed on SIGTERM
    with log.open("a") as f:
        f.write("this is not json\n")
        f.write(lines[0][: len(lines[0]) // 2])  # cut off mid-line, no newline
    return {"v1": v1, "v2": v2, "log": log, "root": root,
            "versions": (load_policy(v1).version, load_policy(v2).version)}


def review(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["review", *args, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_decisions_of_a_version_not_supplied_are_reported_not_attributed(
        mesh_log: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    v1_version, v2_version = mesh_log["versions"]
    _, out = review(capsys, "--policy", str(mesh_log["v2"]), "--logs", str(mesh_log["log"]))
    assert out["summary"]["unknown_versions"] == {v1_version: len(CALLS)}
    assert out["summary"]["by_version"] == {v2_version: len(CALLS)}
    assert any(f["kind"] == "unknown_policy_version" for f in out["findings"])


def test_review_of_real_mesh_logs(mesh_log: dict[str, Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    v1_version, v2_version = mesh_log["versions"]
    patch = mesh_log["root"] / "tighten.patch"
    code, out = review(capsys, "--policy", str(mesh_log["v2"]), "--policy", str(mesh_log["v1"]),
                       "--logs", str(mesh_log["log"]), "--patch-out", str(patch),
                       "--fail-on", "medium")
    assert code == 1
    s = out["summary"]
    assert s["by_version"] == {v1_version: len(CALLS), v2_version: len(CALLS)}
    assert s["unknown_versions"] == {} and s["unauthenticated"] == 2
    assert (out["read"]["malformed"], out["read"]["truncated"]) == (1, 1)
    found = {(f["kind"], f["subject"]): f for f in out["findings"]}
    unused = sorted(subj for kind, subj in found if kind == "unused_grant")
    assert unused == ["checkout -> reserve-stock", "orders -> read-charge",
                      "reporting -> read-stock"]
    dry = found[("dry_run_not_ready", "lockdown")]["details"]
    assert dry["count"] == 1 and dry["principals"] == {WORKLOADS["billing"]: 1}
    narrow = found[("narrower_use", "read-orders")]["details"]
    assert narrow["used_shapes"] == {"/v1/orders/{id}": {"GET": 6}}  # 3 calls x 2 versions

    copy = mesh_log["root"] / "tightened"
    shutil.copytree(mesh_log["v2"], copy)
    subprocess.run(["patch", "-p1", "--batch"], input=patch.read_bytes(), cwd=copy, check=True,
                   capture_output=True)
    tightened = load_policy(copy)
    assert "read-charge" not in {r.name for r in tightened.rules}
    assert main(["validate", str(copy)]) == 0


def test_inventory_of_real_mesh_logs(mesh_log: dict[str, Any],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inventory", "--policy", str(mesh_log["v2"]), "--logs", str(mesh_log["log"]),
                 "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["principals"]}
    assert (rows["checkout"]["allowed"], rows["checkout"]["denied"]) == (8, 4)
    assert rows["reporting"]["flags"] == ["never-seen"]
    assert out["undeclared"] == [] and out["unauthenticated"] == 2
