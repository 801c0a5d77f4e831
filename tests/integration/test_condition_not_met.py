"""A rule that names the caller but whose headers:/when: condition fails says so everywhere
an operator looks: the answer, the decision log, the span, the metrics, `check --explain`."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

from extauthz.decide.pipeline import CheckResult
from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason, Request
from extauthz.observe.decision_log import fast_line, record
from extauthz.observe.tracing import span_attributes

from .server_process import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"


def item_update(tenant: str | None) -> ea.CheckRequest:
    req = ea.CheckRequest()
    req.attributes.source.principal = CHECKOUT
    http = req.attributes.request.http
    http.method, http.host, http.path = "PUT", "orders.mesh.local", "/v1/orders/1/items/2"
    if tenant is not None:
        http.headers["x-tenant-id"] = tenant
    return req


def test_a_missing_header_is_condition_not_met_in_the_answer_log_and_metrics(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy)
    log = tmp_path / "decisions.log"
    metrics = f"127.0.0.1:{free_port()}"
    extra = ["--decision-log", str(log), "--metrics-listen", metrics]
    with running_server(policy, tmp_path, extra=extra) as srv:
        with grpc.insecure_channel(srv.target) as ch:
            stub = ea_grpc.AuthorizationStub(ch)
            denied = stub.Check(item_update(None), timeout=5)
            secret = "Bearer-like-SECRET-value!"
            stub.Check(item_update(secret), timeout=5)  # present but not matching the regex
            allowed = stub.Check(item_update("acme"), timeout=5)
        assert allowed.HasField("ok_response")
        headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
        assert denied.denied_response.status.code == 403
        assert headers["x-extauthz-reason"] == "condition_not_met"
        deadline = time.monotonic() + 10
        while log.read_text().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        missing, mismatched = lines[0], lines[1]
        assert (missing["reason"], missing["rule"]) == ("condition_not_met", "orders-item-update")
        assert missing["condition"] == "rule orders-item-update: header x-tenant-id is missing"
        assert mismatched["condition"] == ("rule orders-item-update: header x-tenant-id does not "
                                           "match ~ '[a-z0-9-]{1,40}'")
        assert "SECRET" not in log.read_text()  # a header's value is never logged
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'extauthz_checks_total{decision="deny",reason="condition_not_met",status="403"} 2.0' \
            in text


def test_the_span_and_both_log_encoders_carry_the_condition() -> None:
    ident = Identity(CHECKOUT, IdentitySource.MTLS, "prod.example")
    decision = Decision(Outcome.FORBIDDEN, Reason.CONDITION_NOT_MET,
                        "rule r: header x-tenant is missing", rule="r", identity=ident,
                        policy_version="v1")
    request = Request(method="GET", host="h", path="/")
    result = CheckResult(decision)
    attrs = span_attributes(request, result)
    assert attrs["extauthz.reason"] == "condition_not_met" and attrs["extauthz.rule"] == "r"
    assert attrs["extauthz.condition"] == "rule r: header x-tenant is missing"
    entry = record(1.0, request, result, 0.001)
    assert entry["condition"] == "rule r: header x-tenant is missing"
    assert json.loads(fast_line((1.0, request, result, 0.001, "", ""))) == entry
    other = record(1.0, request, CheckResult(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE,
                                                      "no rule matches this route")), 0.001)
    assert other["condition"] is None
