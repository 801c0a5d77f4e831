"""Shared by the access-review tests (no tests here): a small policy written to files, and
decision-log records made the way the server makes them -- the compiled policy decides,
`decision_log.record` writes the line -- so the review reads what production writes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from extauthz.decide.pipeline import CheckResult
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request
from extauthz.observe.decision_log import record
from extauthz.policy.compiled import CompiledPolicy
from extauthz.sources.policy_store import load_policy

HOST = "orders.mesh"
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"
BILLING = "spiffe://prod.example/ns/pay/sa/billing"
CART = "spiffe://prod.example/ns/shop/sa/cart"
LEGACY = "spiffe://prod.example/ns/old/sa/legacy"
T0 = 1_714_564_800.0  # 2024-05-01T12:00:00Z

ORDERS_YAML = f"""\
# Orders service policy (test)
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [{HOST}]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
    owner: team-checkout
  - name: billing
    spiffe: {BILLING}
    owner: team-billing
  - name: shop
    spiffe: spiffe://prod.example/ns/shop/sa/*
  - name: legacy
    spiffe: {LEGACY}
    owner: team-legacy
rules:
  # Readers: checkout and billing.
  - name: read-orders
    methods: [GET, HEAD]
    path_prefix: /v1/orders
    allow: [checkout, billing]   # billing reads for invoices
  - name: create-order
    methods: [POST]
    path: /v1/orders
    allow: [checkout, legacy]
  - name: admin
    path_prefix: /admin
    allow: [shop]
  - name: lockdown
    methods: [GET]
    path_prefix: /v1/orders
    deny: [billing]
    mode: dry-run
"""


def write_policy(directory: Path, text: str = ORDERS_YAML) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "orders.yaml").write_text(text, encoding="utf-8")
    return directory


def policy_at(directory: Path, text: str = ORDERS_YAML) -> CompiledPolicy:
    return load_policy(write_policy(directory, text))


def rec(policy: CompiledPolicy, who: str | None, method: str, path: str, i: int = 0, *,
        host: str = HOST, source: IdentitySource = IdentitySource.MTLS, issuer: str = "",
        reason: Reason | None = None, claims: dict[str, Any] | None = None,
        **extra: Any) -> dict[str, Any]:
    """One decision-log record: `policy` decides, unless `reason` forces a 401/429."""
    ident = None
    if who is not None:
        td = who.split("/")[2] if who.startswith("spiffe://") else "jwt.example"
        ident = Identity(who, source, td, issuer, subject=who if issuer else "",
                         claims=MappingProxyType(claims or {}))
    if reason in (Reason.REVOKED, Reason.UNTRUSTED_TRUST_DOMAIN, Reason.NO_IDENTITY):
        decision = Decision(Outcome.UNAUTHENTICATED, reason, policy_version=policy.version)
    else:
        assert ident is not None
        decision = policy.evaluate(ident, host, method, path).decision
        if reason is Reason.RATE_LIMITED:
            decision = Decision(Outcome.RATE_LIMITED, reason, rule=decision.rule,
                                identity=ident, policy_version=policy.version)
    out = record(T0 + i, Request(method=method, host=host, path=path), CheckResult(decision),
                 0.0001)
    out.update(extra)
    return out


def write_log(path: Path, records: Iterable[dict[str, Any]], tail: str = "") -> Path:
    with path.open("w", encoding="ascii") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)
    return path
