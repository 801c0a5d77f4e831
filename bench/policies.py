"""The benchmark's policy: exactly `total` rules (10,000 by default), generated into a
directory (a temporary one during `make bench`; nothing generated is committed).

Self-contained on purpose: the repository's `policy/` examples grow new features, and the
benchmark must keep measuring the same thing (and stay expressible as Envoy RBAC). It uses
what every deployment uses — hosts, methods, exact paths, segment prefixes, SPIFFE IDs and
patterns, deny rules, a dry-run rule, rate limits:

* `orders.yaml` / `inventory.yaml`: the services of the README example (frozen copies), with
  the rule the benchmark request hits: `orders-read` allows `billing` on GET /v1/orders/...;
* `zz-orders-extra.yaml`: ~1,000 more rules on `orders.mesh.local` (the request's host), on
  other prefixes and exact paths, deny rules among them, none matching the request;
* `svc-NNN.yaml`: 100 generated services with their own hosts and principals.

    python bench/policies.py DIR [RULES]
"""

from __future__ import annotations

import sys
from pathlib import Path

SERVICES = 100
PRINCIPALS_PER_SERVICE = 5
METHOD_SETS = ("[GET]", "[GET, HEAD]", "[POST]", "[PUT, PATCH]", "[DELETE]", "[GET, POST]")

ORDERS = """\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: checkout
    spiffe: spiffe://prod.example/ns/shop/sa/checkout
    limit: {rate: 100, period: 1s, burst: 50}
  - name: billing
    spiffe: spiffe://prod.example/ns/finance/sa/billing
  - name: shop-workloads
    spiffe: spiffe://prod.example/ns/shop/sa/*
rules:
  - name: orders-read
    methods: [GET, HEAD]
    path_prefix: /v1/orders
    allow: [checkout, billing]
  - name: orders-create
    methods: [POST]
    path: /v1/orders
    allow: [checkout]
    limit: {rate: 20, period: 1s, burst: 10}
  - name: orders-refund
    methods: [POST]
    path_prefix: /v1/refunds
    allow: [billing]
  - name: orders-health
    methods: [GET]
    path: /healthz
    allow: ["*"]
"""

INVENTORY = """\
apiVersion: extauthz/v1
owner: team-inventory
service: inventory
hosts: [inventory.mesh.local]
principals:
  - name: warehouse
    spiffe: spiffe://prod.example/ns/logistics/sa/warehouse
rules:
  - name: stock-read
    methods: [GET]
    path_prefix: /v1/stock
    allow: [checkout, warehouse, shop-workloads]
  - name: stock-adjust
    methods: [PUT, PATCH]
    path_prefix: /v1/stock
    allow: [warehouse]
  - name: stock-audit
    methods: [GET]
    path_prefix: /v1/audit
    allow: [warehouse]
    mode: dry-run
"""
FIXED_RULES = 7  # in ORDERS and INVENTORY


def _rules(prefix: str, n: int, principals: list[str], *, deny_every: int = 0) -> list[str]:
    out = []
    for r in range(n):
        who = ", ".join(principals[: 1 + r % len(principals)])
        methods = METHOD_SETS[r % len(METHOD_SETS)]
        if r % 3 == 0:
            match = f"path: /api/v{1 + r % 3}/r{r}/items"
        else:
            match = f"path_prefix: /api/v{1 + r % 3}/r{r}"
        verb = "deny" if deny_every and r % deny_every == 0 else "allow"
        out.append(
            f"  - name: {prefix}-r{r}\n"
            f"    methods: {methods}\n"
            f"    {match}\n"
            f"    {verb}: [{who}]\n"
        )
    return out


def _service(i: int, rules: int) -> str:
    names = [f"s{i:03d}-c{j}" for j in range(PRINCIPALS_PER_SERVICE)]
    principals = "".join(
        f"  - name: {n}\n    spiffe: spiffe://prod.example/ns/team{i:03d}/sa/caller{j}\n"
        for j, n in enumerate(names)
    )
    return (
        "apiVersion: extauthz/v1\n"
        f"owner: team-{i:03d}\n"
        f"service: svc-{i:03d}\n"
        f"hosts: [svc-{i:03d}.mesh.local, svc-{i:03d}.internal]\n"
        f"principals:\n{principals}"
        "rules:\n" + "".join(_rules(f"s{i:03d}", rules, names, deny_every=17))
    )


def _orders_extra(rules: int) -> str:
    who = ["checkout", "billing", "warehouse", "shop-workloads"]
    return (
        "apiVersion: extauthz/v1\n"
        "owner: team-orders\n"
        "service: orders-extra\n"
        "hosts: [orders.mesh.local]\n"
        "rules:\n" + "".join(_rules("orders-x", rules, who, deny_every=11))
    )


def generate(directory: Path, total: int = 10_000) -> int:
    """Write the policy into `directory` (created); return the number of rules written."""
    if total < FIXED_RULES + SERVICES:
        raise ValueError(f"at least {FIXED_RULES + SERVICES} rules")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "orders.yaml").write_text(ORDERS, encoding="utf-8")
    (directory / "inventory.yaml").write_text(INVENTORY, encoding="utf-8")
    remaining = total - FIXED_RULES
    extra = min(1_000, remaining // 10)
    (directory / "zz-orders-extra.yaml").write_text(_orders_extra(extra), encoding="utf-8")
    remaining -= extra
    per, rest = divmod(remaining, SERVICES)
    for i in range(SERVICES):
        n = per + (1 if i < rest else 0)
        (directory / f"svc-{i:03d}.yaml").write_text(_service(i, n), encoding="utf-8")
    return total


if __name__ == "__main__":
    target = Path(sys.argv[1])
    print(target, generate(target, int(sys.argv[2]) if len(sys.argv) > 2 else 10_000))
