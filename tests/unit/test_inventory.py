"""The inventory: declared principals, owners, grants, activity, and what is flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extauthz.cli.main import main
from extauthz.cli.review import explicit_owners, policy_texts
from extauthz.model import IdentitySource, Reason
from extauthz.sources.policy_store import load_policy
from extauthz.tools.inventory import InventoryBuilder, format_inventory
from tests.unit.test_review_support import (
    BILLING,
    CART,
    CHECKOUT,
    ORDERS_YAML,
    rec,
    write_log,
    write_policy,
)

STRANGER = "spiffe://prod.example/ns/x/sa/stranger"
JWT_POLICY = ORDERS_YAML.replace(
    "rules:\n",
    "  - name: partner\n    jwt: {issuer: https://idp.example, subject: partner-42}\n"
    "    owner: team-partners\n"
    "rules:\n  - name: partner-read\n    methods: [GET]\n    path: /v1/catalog\n"
    "    allow: [partner]\n", 1)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "p")


def test_inventory_cli_usage_errors_exit_2(tmp_path: Path, policy_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inventory", "--policy", str(tmp_path / "missing")]) == 2
    assert main(["inventory", "--policy", str(policy_dir), "--logs",
                 str(tmp_path / "none.log")]) == 2
    assert "none.log" in capsys.readouterr().err


def test_without_logs_every_declaration_with_owner_identity_and_grants(
        policy_dir: Path) -> None:
    inv = InventoryBuilder(load_policy(policy_dir)).result(with_logs=False)
    rows = {r.name: r for r in inv.principals}
    assert list(rows) == ["billing", "checkout", "legacy", "shop"]
    assert rows["checkout"].owner == "team-checkout"
    assert rows["checkout"].grants == ("create-order: POST orders.mesh/v1/orders",
                                       "read-orders: GET,HEAD orders.mesh/v1/orders/**")
    assert rows["shop"].identity == "spiffe://prod.example/ns/shop/sa/* (pattern)"
    assert rows["checkout"].activity is None and "never-seen" not in rows["checkout"].flags
    assert inv.as_dict()["undeclared"] is None


def test_an_inherited_owner_and_a_principal_nobody_grants_are_flagged(tmp_path: Path) -> None:
    text = ORDERS_YAML.replace("allow: [shop]", "allow: [checkout]")
    d = write_policy(tmp_path / "p", text)
    owners = explicit_owners(policy_texts(d))
    assert owners == frozenset({"checkout", "billing", "legacy"})
    rows = {r.name: r for r in InventoryBuilder(load_policy(d), owners).result(False).principals}
    assert rows["shop"].flags == ("owner-inherited", "no-grants")
    assert rows["shop"].owner == "team-orders"
    assert "owner of file: team-orders" in rows["shop"].declared_in
    assert rows["checkout"].flags == ()


def test_any_caller_rules_are_listed_apart(tmp_path: Path) -> None:
    d = write_policy(tmp_path / "p", ORDERS_YAML.replace("allow: [shop]", "allow: ['*']"))
    rows = {r.name: r for r in InventoryBuilder(load_policy(d)).result(False).principals}
    assert rows["legacy"].any_caller == ("admin",)


def test_activity_seen_never_seen_and_undeclared(policy_dir: Path) -> None:
    p = load_policy(policy_dir)
    records = [rec(p, CHECKOUT, "GET", "/v1/orders/1", 3), rec(p, CHECKOUT, "DELETE", "/x", 1),
               rec(p, CART, "GET", "/admin/x", 2), rec(p, STRANGER, "GET", "/v1/orders", 4),
               rec(p, None, "GET", "/", 5, reason=Reason.NO_IDENTITY)]
    inv = InventoryBuilder(p).feed_all(records).result()
    rows = {r.name: r for r in inv.principals}
    a = rows["checkout"].activity
    assert a is not None and (a.allowed, a.denied) == (1, 1)
    assert (a.first_seen, a.last_seen) == ("2024-05-01T12:00:01.000000Z",
                                           "2024-05-01T12:00:03.000000Z")
    assert rows["shop"].activity is not None and rows["shop"].activity.allowed == 1  # pattern
    assert "never-seen" in rows["billing"].flags
    assert [u for u, _ in inv.undeclared] == [STRANGER]
    assert inv.unauthenticated == 1


def test_undeclared_tracking_is_bounded(policy_dir: Path) -> None:
    p = load_policy(policy_dir)
    records = [rec(p, f"spiffe://prod.example/ns/x/sa/s{n}", "GET", "/") for n in range(30)]
    inv = InventoryBuilder(p, max_undeclared=10).feed_all(records).result()
    assert len(inv.undeclared) == 10 and inv.undeclared_overflow == 20
    assert "20 more not tracked" in format_inventory(inv)


def test_jwt_principals_are_shown_and_matched_by_issuer_and_subject(tmp_path: Path) -> None:
    d = write_policy(tmp_path / "p", JWT_POLICY)
    p = load_policy(d)
    call = rec(p, "partner-42", "GET", "/v1/catalog", source=IdentitySource.JWT,
               issuer="https://idp.example")
    assert call["decision"] == "allow"
    rows = {r.name: r for r in InventoryBuilder(p).feed_all([call]).result().principals}
    assert rows["partner"].identity == "jwt iss=https://idp.example sub=partner-42"
    assert rows["partner"].activity is not None and rows["partner"].activity.allowed == 1


def test_inventory_cli_formats(tmp_path: Path, policy_dir: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    p = load_policy(policy_dir)
    log = write_log(tmp_path / "d.log", [rec(p, BILLING, "GET", "/v1/orders/1")], tail="{bad\n")
    base = ["inventory", "--policy", str(policy_dir), "--logs", str(log)]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"Inventory of policy {p.version}: 4 declared")
    assert "1 malformed" in text and "never-seen" in text
    assert main([*base, "--format", "markdown"]) == 0
    assert "| billing | team-billing |" in capsys.readouterr().out
    assert main([*base, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["read"]["malformed"] == 1
    assert [r["name"] for r in data["principals"]] == ["billing", "checkout", "legacy", "shop"]
    assert data["principals"][0]["denied"] == 0 and data["principals"][0]["allowed"] == 1
