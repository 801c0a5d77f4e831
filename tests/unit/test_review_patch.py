"""Access review: the suggested tightened policy (a patch that loads) and the CLI contract."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from extauthz.cli.main import main
from extauthz.model import Identity, IdentitySource
from extauthz.sources.policy_store import load_policy
from extauthz.tools.review import (
    Patch,
    PatchError,
    ReviewConfig,
    Reviewer,
    check_patch,
    render_patch,
)
from tests.unit.test_review_support import (
    BILLING,
    CART,
    CHECKOUT,
    HOST,
    LEGACY,
    ORDERS_YAML,
    rec,
    write_log,
    write_policy,
)

POLICY_TEST = """\
cases:
  - {name: checkout reads, principal: checkout, method: GET, path: /v1/orders/42, expect: allow}
  - {name: legacy is cut off, principal: legacy, method: POST, path: /v1/orders, expect: deny}
"""


def apply(patch_text: str, directory: Path, patch: Patch) -> None:
    """`patch -p1` when installed; otherwise the rendered files (the same edit)."""
    if shutil.which("patch"):
        subprocess.run(["patch", "-p1", "--forward", "--batch"], input=patch_text.encode(),
                       cwd=directory, check=True, capture_output=True)
    else:  # pragma: no cover - patch(1) is on the CI image
        for source, text in patch.files.items():
            (directory / source).write_text(text)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    d = write_policy(tmp_path / "policy")
    p = load_policy(d)
    records = [
        *(rec(p, CHECKOUT, "GET", f"/v1/orders/{n}", n) for n in range(3)),
        rec(p, CHECKOUT, "GET", "/v1/orders/1/lines/2", 5),
        rec(p, CHECKOUT, "POST", "/v1/orders", 6),
        rec(p, BILLING, "GET", "/v1/orders/9", 7),
    ]
    return d, records


def texts(d: Path) -> dict[str, str]:
    return {"orders.yaml": (d / "orders.yaml").read_text()}


# --- bad paths first -------------------------------------------------------------------------


def test_a_patch_that_would_not_load_is_refused() -> None:
    broken = Patch("", {"orders.yaml": ORDERS_YAML.replace("allow: [shop]", "allow: [nobody]")},
                   ())
    with pytest.raises(PatchError, match="unknown principal 'nobody'"):
        check_patch({"orders.yaml": ORDERS_YAML}, broken)


def test_cli_usage_errors_exit_2(tmp_path: Path, setup: tuple[Path, list[dict[str, Any]]],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    d, records = setup
    log = write_log(tmp_path / "d.log", records)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.yaml").write_text("apiVersion: nope\n")
    assert main(["review", "--policy", str(bad), "--logs", str(log)]) == 2
    assert main(["review", "--policy", str(d), "--logs", str(tmp_path / "none.log")]) == 2
    assert main(["review", "--policy", str(d), "--logs", str(log), "--since", "3 days"]) == 2
    assert main(["review", "--policy", str(d), "--policy-history", str(log),
                 "--logs", str(log)]) == 2
    err = capsys.readouterr().err
    assert "x.yaml" in err and "none.log" in err and "'3 days'" in err


# --- the patch -------------------------------------------------------------------------------


def test_the_patch_applies_loads_validates_and_keeps_what_was_used(
        tmp_path: Path, setup: tuple[Path, list[dict[str, Any]]]) -> None:
    d, records = setup
    report = Reviewer(load_policy(d)).feed_all(records).report()
    patch = render_patch(report, texts(d))
    assert patch.diff.startswith("--- a/orders.yaml\n+++ b/orders.yaml\n")
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    apply(patch.diff, copy, patch)
    after = (copy / "orders.yaml").read_text()
    assert after == patch.files["orders.yaml"]
    assert "# Orders service policy (test)" in after and "# Readers: checkout" in after
    tightened = load_policy(copy)
    for r in records:  # every decision seen still comes out the same
        who = Identity(r["principal"], IdentitySource.MTLS, "prod.example")
        got = tightened.evaluate(who, HOST, r["method"], r["path"]).decision
        assert (got.allowed, got.reason.value) == (r["decision"] == "allow", r["reason"])
    legacy = Identity(LEGACY, IdentitySource.MTLS, "prod.example")
    assert not tightened.evaluate(legacy, HOST, "POST", "/v1/orders").decision.allowed
    cart = Identity(CART, IdentitySource.MTLS, "prod.example")
    assert not tightened.evaluate(cart, HOST, "GET", "/admin/x").decision.allowed
    assert "admin" not in {r.name for r in tightened.rules}  # nobody used it: removed
    assert {r.name: r.decl.path.value for r in tightened.rules if "read" in r.name} == {
        "read-orders": "/v1/orders/{id}", "read-orders-2": "/v1/orders/{id}/lines/{id2}"}
    assert main(["validate", str(copy)]) == 0
    (copy / "orders_test.yaml").write_text(POLICY_TEST)
    assert main(["test", str(copy)]) == 0


def test_nothing_to_tighten_is_an_empty_patch(tmp_path: Path) -> None:
    exact = ORDERS_YAML.split("  - name: read-orders")[0] + (
        "  - name: create-order\n    methods: [POST]\n    path: /v1/orders\n"
        "    allow: [checkout]\n")
    d = write_policy(tmp_path / "p", exact)
    p = load_policy(d)
    report = Reviewer(p).feed_all([rec(p, CHECKOUT, "POST", "/v1/orders")]).report()
    patch = render_patch(report, texts(d))
    assert patch.diff == "" and patch.files == {} and report.changes == {}


def test_a_rule_whose_block_cannot_be_found_is_skipped_not_mangled(
        setup: tuple[Path, list[dict[str, Any]]]) -> None:
    d, records = setup
    report = Reviewer(load_policy(d)).feed_all(records).report()
    odd = texts(d)["orders.yaml"].replace("  - name: admin\n", "  -\n    name: admin\n")
    patch = render_patch(report, {"orders.yaml": odd})
    assert any(s.startswith("admin: cannot locate") for s in patch.skipped)
    check_patch({"orders.yaml": odd}, patch)


# --- the CLI ---------------------------------------------------------------------------------


def test_review_cli_fail_on_and_patch_out(tmp_path: Path, setup: tuple[Path, list[dict[str, Any]]],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    d, records = setup
    log = write_log(tmp_path / "d.log", records, tail="not json\n{\"time\": \"2024")
    out = tmp_path / "tighten.patch"
    args = ["review", "--policy", str(d), "--logs", str(log), "--patch-out", str(out)]
    assert main([*args, "--fail-on", "medium"]) == 1
    text = capsys.readouterr().out
    assert "unused_grant" in text and "legacy -> create-order" in text
    assert "2 log lines skipped: 1 malformed, 1 truncated" in text
    assert out.read_text().startswith("--- a/orders.yaml")
    assert main([*args, "--fail-on", "critical"]) == 0
    assert main(args) == 0  # --fail-on defaults to none


def test_review_cli_json_is_deterministic(tmp_path: Path,
                                          setup: tuple[Path, list[dict[str, Any]]],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d, records = setup
    a = write_log(tmp_path / "a.log", records)
    b = write_log(tmp_path / "b.log", list(reversed(records)))
    outs = []
    for log in (a, b):
        assert main(["review", "--policy", str(d), "--logs", str(log), "--format", "json",
                     "--now", "2024-05-01T13:00:00Z", "--since", "1h"]) == 0
        data = json.loads(capsys.readouterr().out)
        data["read"]["problems"] = []
        outs.append(data)
    assert outs[0] == outs[1]
    sev = [f["severity"] for f in outs[0]["findings"]]
    rank = ["critical", "high", "medium", "low", "info"]
    assert sev == sorted(sev, key=rank.index)
    assert outs[0]["summary"]["window"]["start"] == "2024-05-01T12:00:00.000000Z"


def test_review_cli_history_attributes_earlier_versions(
        tmp_path: Path, setup: tuple[Path, list[dict[str, Any]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    d, records = setup
    new = write_policy(tmp_path / "new", ORDERS_YAML + "  - name: extra\n    path: /x\n"
                       "    allow: [checkout]\n")
    log = write_log(tmp_path / "d.log", records)
    hist = tmp_path / "history"
    shutil.copytree(d, hist / "v1")
    base = ["review", "--policy", str(new), "--logs", str(log), "--format", "json"]
    assert main(base) == 0
    alone = json.loads(capsys.readouterr().out)["summary"]
    assert alone["unknown_versions"] == {load_policy(d).version: 6}
    for extra in (["--policy", str(d)], ["--policy-history", str(hist)]):
        assert main(base + extra) == 0
        summary = json.loads(capsys.readouterr().out)["summary"]
        assert summary["unknown_versions"] == {} and summary["by_version"] == {
            load_policy(d).version: 6}


def test_review_cli_markdown_and_revocations(tmp_path: Path,
                                             setup: tuple[Path, list[dict[str, Any]]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    d, records = setup
    log = write_log(tmp_path / "d.log", records)
    rev = tmp_path / "revoked.yaml"
    rev.write_text(f"principals: [{CHECKOUT}]\n")
    assert main(["review", "--policy", str(d), "--logs", str(log), "--format", "markdown",
                 "--revocations", str(rev), "--fail-on", "critical"]) == 1
    text = capsys.readouterr().out
    assert text.startswith("## Access review of policy")
    assert "| critical | revoked_allowed |" in text
    rev.write_text("principals: nope\n")
    assert main(["review", "--policy", str(d), "--logs", str(log), "--revocations",
                 str(rev)]) == 2
    cfg = ReviewConfig()
    assert cfg.min_denials == 5  # the CLI default matches the library default
