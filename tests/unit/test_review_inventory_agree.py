"""Issue 19: inventory and review read one log the same way; flagged rows are named; review
narrows per caller and learns ids without digits; wide output stays readable."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from extauthz.cli.main import main
from extauthz.model import Reason
from extauthz.tools.inventory import InventoryBuilder, format_inventory, wrap
from extauthz.tools.review import ReviewConfig, Reviewer
from tests.unit.test_review_support import (
    BILLING,
    CHECKOUT,
    LEGACY,
    ORDERS_YAML,
    policy_at,
    rec,
    write_log,
    write_policy,
)

FOREIGN = "spiffe://other.example/ns/x/sa/intruder"


def one_log(p):  # type: ignore[no-untyped-def]
    return [
        rec(p, CHECKOUT, "GET", "/v1/orders/1", 1),
        rec(p, CHECKOUT, "GET", "/v1/orders/2", 2),
        rec(p, CHECKOUT, "POST", "/v1/orders", 3),
        rec(p, CHECKOUT, "DELETE", "/v1/orders/2", 4),  # denied
        rec(p, BILLING, "GET", "/v1/orders/3", 5),  # allowed before it was revoked
        *[rec(p, None, "GET", "/v1/orders/9", 10 + i, reason=Reason.REVOKED,
              presented_principal=BILLING) for i in range(6)],
        *[rec(p, None, "GET", "/v1/orders/9", 20 + i, reason=Reason.UNTRUSTED_TRUST_DOMAIN,
              presented_principal=FOREIGN) for i in range(2)],
        rec(p, None, "GET", "/", 30, reason=Reason.NO_IDENTITY),
    ]


def test_inventory_and_review_agree_on_every_shared_figure(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p")
    records = one_log(p)
    inv = InventoryBuilder(p).feed_all(records).result()
    review = Reviewer(p, config=ReviewConfig(revoked_principals=frozenset({BILLING})))
    report = review.feed_all(records).report()
    s = report.summary
    assert inv.records == s["in_window"] == len(records)
    assert inv.unauthenticated == s["unauthenticated"] == 9
    rows = {r.name: r for r in inv.principals}
    billing = rows["billing"].activity
    assert billing is not None and (billing.allowed, billing.denied, billing.refused) == (1, 0, 6)
    assert "never-seen" not in rows["billing"].flags  # it kept trying
    trying = next(f for f in report.findings if f.kind == "revoked_still_trying")
    assert trying.subject == BILLING
    assert trying.details["count"] == billing.allowed + billing.denied + billing.refused
    assert (trying.details["refused"], trying.details["allowed"]) == (billing.refused,
                                                                      billing.allowed)
    assert "7 requests (6 refused, 1 allowed)" in trying.message
    foreign = dict(inv.undeclared)[FOREIGN]
    untrusted = next(f for f in report.findings if f.kind == "untrusted_trust_domain")
    assert foreign.refused == untrusted.details["presented"][FOREIGN] == 2
    checkout = rows["checkout"].activity
    assert checkout is not None and (checkout.allowed, checkout.denied) == (3, 1)


def test_a_principal_only_ever_refused_is_flagged_refused_only(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p")
    records = [rec(p, None, "GET", "/v1/orders/9", i, reason=Reason.REVOKED,
                   presented_principal=LEGACY) for i in range(3)]
    rows = {r.name: r for r in InventoryBuilder(p).feed_all(records).result().principals}
    assert "refused-only" in rows["legacy"].flags and "never-seen" not in rows["legacy"].flags


def test_the_summary_names_the_flagged_rows_and_marks_them(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p")
    inv = InventoryBuilder(p).feed_all(one_log(p)).result()
    flagged = [r.name for r in inv.principals if r.flags] + [FOREIGN]
    text = format_inventory(inv, "table", width=400)
    first = text.splitlines()[0]  # one line at this width
    assert first.endswith(f"{len(flagged)} flagged (marked !): {', '.join(flagged)}")
    marked = [line.split()[1] for line in text.splitlines() if line.startswith("! ")]
    assert marked == [r.name for r in inv.principals if r.flags]
    assert all(r.flags for r in inv.principals if r.name in marked)


def test_wide_inventories_wrap_to_the_width_or_become_cards(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p")
    inv = InventoryBuilder(p).feed_all(one_log(p)).result()
    wide = format_inventory(inv, "table", width=10_000)
    assert max(len(line) for line in wide.splitlines()) > 120  # the unwrapped table is wide
    wrapped = format_inventory(inv, "table", width=120)
    assert max(len(line) for line in wrapped.splitlines()) <= 120
    assert CHECKOUT not in wrapped and "spiffe://" in wrapped  # broken after a `/`
    cards = format_inventory(inv, "auto", width=100)
    assert "\n    identity:  " + CHECKOUT in cards
    assert "3 allowed, 1 denied, 0 refused" in cards


def test_csv_keeps_every_cell_whole(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p")
    inv = InventoryBuilder(p).feed_all(one_log(p)).result()
    rows = list(csv.DictReader(io.StringIO(format_inventory(inv, "csv"))))
    by_name = {r["PRINCIPAL"]: r for r in rows}
    assert by_name["checkout"]["IDENTITY"] == CHECKOUT
    assert by_name["billing"]["REFUSED"] == "6"


def test_wrap_breaks_after_slashes_and_cuts_what_cannot_break() -> None:
    assert wrap("spiffe://prod.example/ns/shop/sa/checkout", 20) == [
        "spiffe://", "prod.example/ns/", "shop/sa/checkout"]
    assert wrap("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]
    assert wrap("", 10) == [""]


def test_review_cli_csv_and_a_table_within_the_width(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    d = write_policy(tmp_path / "p")
    p = policy_at(tmp_path / "p")
    log = write_log(tmp_path / "d.log", one_log(p))
    base = ["review", "--policy", str(d), "--logs", str(log)]
    assert main([*base, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and set(rows[0]) == {"severity", "kind", "subject", "message"}
    assert main([*base, "--width", "100"]) == 0
    table_lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(table_lines) if line.startswith("SEVERITY"))
    assert max(len(line) for line in table_lines[start:]
               if not line.startswith("Suggested patch")) <= 100


NARROW_YAML = ORDERS_YAML.replace("""  - name: create-order
    methods: [POST]
    path: /v1/orders
    allow: [checkout, legacy]""", """  - name: create-order
    methods: [GET, POST]
    path: /v1/orders
    allow: [checkout, legacy]""")


def test_a_caller_granted_get_and_post_that_only_gets_is_reported(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p", NARROW_YAML)
    records = [rec(p, CHECKOUT, "GET", "/v1/orders", 1), rec(p, CHECKOUT, "POST", "/v1/orders", 2),
               rec(p, LEGACY, "GET", "/v1/orders", 3), rec(p, LEGACY, "GET", "/v1/orders", 4)]
    assert all(r["decision"] == "allow" and r["rule"] == "create-order" for r in records)
    report = Reviewer(p).feed_all(records).report()
    per_caller = [f for f in report.findings if f.kind == "narrower_use_by_caller"]
    assert [f.subject for f in per_caller] == ["legacy -> create-order"]
    assert per_caller[0].details["used"] == ["GET"] and per_caller[0].details["calls"] == 2
    assert "methods: [GET]" in per_caller[0].message
    # The rule as a whole used both methods: no rule-level narrowing.
    assert not [f for f in report.findings if f.kind == "narrower_use" and
                f.subject == "create-order"]


def test_callers_that_all_use_the_same_methods_get_the_rule_level_finding_only(
        tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p", NARROW_YAML)
    records = [rec(p, CHECKOUT, "GET", "/v1/orders", 1), rec(p, LEGACY, "GET", "/v1/orders", 2)]
    report = Reviewer(p).feed_all(records).report()
    assert not [f for f in report.findings if f.kind == "narrower_use_by_caller"]
    assert [f for f in report.findings if f.kind == "narrower_use" and f.subject == "create-order"]


USERS_YAML = ORDERS_YAML.replace("""  - name: admin
    path_prefix: /admin
    allow: [shop]""", """  - name: admin
    path_prefix: /admin
    allow: [shop]
  - name: users
    methods: [GET, PUT]
    path_prefix: /v1/users
    allow: [checkout]""")
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
         "mallory", "oscar"]


def test_usernames_are_generalised_to_one_template(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p", USERS_YAML)
    records = [rec(p, CHECKOUT, "GET", f"/v1/users/{n}", i) for i, n in enumerate(NAMES)]
    records += [rec(p, CHECKOUT, "GET", f"/v1/users/{n}/orders/{i}", 50 + i)
                for i, n in enumerate(NAMES)]
    report = Reviewer(p).feed_all(records).report()
    found = next(f for f in report.findings if f.kind == "narrower_use" and f.subject == "users")
    assert set(found.details["used_shapes"]) == {"/v1/users/{id}", "/v1/users/{id}/orders/{id2}"}
    assert "/v1/users/{id}" in found.details["suggestion"]


def test_a_few_named_sub_resources_stay_literal(tmp_path: Path) -> None:
    p = policy_at(tmp_path / "p", USERS_YAML)
    records = [rec(p, CHECKOUT, "GET", f"/v1/users/{n}", i)
               for i, n in enumerate(["me", "search", "count"] * 4)]
    report = Reviewer(p).feed_all(records).report()
    found = next(f for f in report.findings if f.kind == "narrower_use" and f.subject == "users")
    assert set(found.details["used_shapes"]) == {"/v1/users/me", "/v1/users/search",
                                                 "/v1/users/count"}
