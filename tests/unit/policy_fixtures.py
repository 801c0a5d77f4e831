"""Small policies built in code for unit tests (no files)."""

from __future__ import annotations

from typing import Any

from extauthz.policy.compiled import CompiledPolicy, compile_policy
from extauthz.policy.document import parse_document

CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"
BILLING = "spiffe://prod.example/ns/finance/sa/billing"
CART = "spiffe://prod.example/ns/shop/sa/cart"
INTRUDER = "spiffe://prod.example/ns/shopping/sa/x"


def doc(rules: list[dict[str, Any]], principals: list[dict[str, Any]] | None = None,
        hosts: list[str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "extauthz/v1",
        "owner": "team-orders",
        "service": "orders",
        "hosts": hosts or ["orders.mesh.local"],
        "principals": principals if principals is not None else [
            {"name": "checkout", "spiffe": CHECKOUT, "limit": {"rate": 3, "period": "1s", "burst": 3}},
            {"name": "billing", "spiffe": BILLING},
            {"name": "shop", "spiffe": "spiffe://prod.example/ns/shop/sa/*"},
        ],
        "rules": rules,
    }


def compiled(rules: list[dict[str, Any]], version: str = "v1", **kw: Any) -> CompiledPolicy:
    return compile_policy([parse_document(doc(rules, **kw), "test.yaml")], version)
