"""Every decision carries the policy version (content hash) that made it, whatever its reason."""

from __future__ import annotations

from pathlib import Path

from extauthz.model import Reason
from extauthz.sources.policy_store import load_policy
from extauthz.tools.explain import Probe, decide

REPO_POLICY = Path(__file__).resolve().parents[2] / "policy"
ORDERS = "orders.mesh.local"


def test_every_reason_names_the_version() -> None:
    policy = load_policy(REPO_POLICY)
    assert len(policy.version) == 16 and int(policy.version, 16) >= 0
    probes = {
        Reason.ALLOWED: Probe("checkout", "GET", "/v1/orders/1", ORDERS),
        Reason.DRY_RUN: Probe("checkout", "GET", "/v1/orders/export/x", ORDERS),
        Reason.DENIED_BY_RULE: Probe("checkout", "GET", "/v1/admin/x", "payments.mesh.local"),
        Reason.PRINCIPAL_NOT_ALLOWED: Probe("billing", "POST", "/v1/orders", ORDERS),
        Reason.NO_MATCHING_RULE: Probe("checkout", "GET", "/nowhere", ORDERS),
        Reason.METHOD_OVERRIDE: Probe("checkout", "GET", "/v1/orders/1", ORDERS,
                                      {"x-http-method-override": "DELETE"}),
        Reason.AMBIGUOUS_PATH: Probe("checkout", "GET", "/v1/orders/%2F", ORDERS),
        Reason.MALFORMED_REQUEST: Probe("checkout", "FETCH", "/v1/orders/1", ORDERS),
    }
    for want, probe in probes.items():
        decision, _ = decide(policy, probe)
        assert decision.reason is want, (want, decision)
        assert decision.policy_version == policy.version, want
