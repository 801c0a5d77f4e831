"""Spans, decision log and metrics from a real `python -m extauthz serve` process."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from prometheus_client.parser import text_string_to_metric_families

from .server_process import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO / "docs" / "decision-log.schema.json").read_text())
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"
CART = "spiffe://prod.example/ns/shop/sa/cart"  # declared through the pattern "shop"
STRANGER = "spiffe://prod.example/ns/elsewhere/sa/stranger"
SECRET = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"

POLICY = f"""\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
  - name: shop
    spiffe: spiffe://prod.example/ns/shop/sa/*
rules:
  - name: orders-read
    methods: [GET]
    path_prefix: /v1/orders
    allow: [checkout, shop]
  - name: orders-audit
    methods: [GET]
    path_prefix: /v1/audit
    allow: [checkout]
    mode: dry-run
"""


def check(target: str, principal: str, path: str = "/v1/orders/1",
          headers: dict[str, str] | None = None) -> int:
    req = ea.CheckRequest()
    req.attributes.source.principal = principal
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", path
    http.headers.update(headers or {})
    with grpc.insecure_channel(target) as ch:
        resp = ea_grpc.AuthorizationStub(ch).Check(req, timeout=5)
    return 200 if resp.HasField("ok_response") else int(resp.denied_response.status.code)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert SECRET not in text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    (d / "orders.yaml").write_text(POLICY)
    return d


def test_spans_decision_log_and_metrics_from_a_real_process(
    policy_dir: Path, tmp_path: Path
) -> None:
    metrics_port = free_port()
    decisions = tmp_path / "decisions.log"
    args = ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--decision-log", str(decisions)]
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_SERVICE_NAME": "extauthz-test"}
    sampled = {"traceparent": f"00-{TRACE}-{PARENT}-01", "authorization": f"Bearer {SECRET}"}
    with running_server(policy_dir, tmp_path, args, env) as srv:
        assert check(srv.target, CHECKOUT, f"/v1/orders/1?token={SECRET}", sampled) == 200
        assert check(srv.target, CHECKOUT, "/v1/orders/1",
                     {"traceparent": f"00-{TRACE}-{PARENT}-00"}) == 200  # unsampled: no span
        assert check(srv.target, CART) == 200
        assert check(srv.target, STRANGER) == 403
        assert check(srv.target, "not-a-spiffe-id") == 401
        assert check(srv.target, CART, "/v1/audit/x") == 200  # dry-run rule: would deny
        s = scrape(metrics_port)
    log = srv.log()  # stdout (console spans) and stderr (operational logs)

    # Metrics: counts by decision/reason, per declared principal, cache, policy.
    assert s[("extauthz_checks_total", (("decision", "allow"), ("reason", "allowed"),
                                        ("status", "200")))] == 3
    principals = {k[1]: v for k, v in s.items() if k[0] == "extauthz_principal_checks_total"}
    assert principals[(("decision", "allow"), ("principal", "checkout"),
                       ("reason", "allowed"))] == 2
    assert principals[(("decision", "allow"), ("principal", "shop"), ("reason", "allowed"))] == 1
    assert principals[(("decision", "allow"), ("principal", "shop"),
                       ("reason", "dry_run_would_deny"))] == 1
    assert principals[(("decision", "deny"), ("principal", "unknown"),
                       ("reason", "principal_not_allowed"))] == 1
    assert principals[(("decision", "deny"), ("principal", "none"),
                       ("reason", "invalid_identity"))] == 1
    assert s[("extauthz_check_duration_seconds_count", (("decision", "allow"),))] == 4
    assert s[("extauthz_decision_cache_hits_total", ())] >= 1
    assert s[("extauthz_policy_reloads_total", ())] == 1
    assert s[("extauthz_policy_loaded", ())] == 1
    assert ("extauthz_decision_log_lines_total", (("result", "dropped"),)) in s

    # Decision log: one valid line per decision; flushed on SIGTERM.
    entries = json_lines(decisions.read_text())
    assert len(entries) == 6, entries
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for entry in entries:
        validator.validate(entry)
    first = entries[0]
    assert (first["principal"], first["decision"], first["rule"], first["path"]) == \
        (CHECKOUT, "allow", "orders-read", "/v1/orders/1")
    assert first["trace_id"] == TRACE and first["span_id"]
    assert entries[1]["trace_id"] == TRACE and entries[1]["span_id"] is None
    assert entries[3]["reason"] == "principal_not_allowed" and entries[3]["principal"] == STRANGER
    assert entries[5]["dry_run"] is True and entries[5]["reason"] == "dry_run_would_deny"

    # Spans (console exporter, one JSON object per line on stdout): only the sampled parent.
    spans = [e for e in json_lines(log) if "context" in e and "parent_id" in e]
    children = [sp for sp in spans if sp["context"]["trace_id"] == f"0x{TRACE}"]
    assert len(children) == 1, spans
    span = children[0]
    assert span["parent_id"] == f"0x{PARENT}" and span["kind"] == "SpanKind.SERVER"
    assert span["context"]["span_id"] == f"0x{first['span_id']}"
    assert span["attributes"]["enduser.id"] == CHECKOUT
    assert span["attributes"]["extauthz.rule"] == "orders-read"
    assert span["attributes"]["url.path"] == "/v1/orders/1"
    assert span["resource"]["attributes"]["service.name"] == "extauthz-test"
    assert len(spans) == 1  # no root spans by default: never more than the mesh samples

    # Never a credential in any output.
    for text in (log, decisions.read_text()):
        assert SECRET not in text


def test_tracing_off_and_decision_log_to_stdout(policy_dir: Path, tmp_path: Path) -> None:
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_on"}
    with running_server(policy_dir, tmp_path, ["--no-tracing", "--decision-log-sample-allowed",
                                               "0"], env) as srv:
        assert check(srv.target, CHECKOUT, headers={
            "traceparent": f"00-{TRACE}-{PARENT}-01"}) == 200  # sampled out
        assert check(srv.target, STRANGER, headers={
            "traceparent": f"00-{TRACE}-{PARENT}-01"}) == 403
        deadline = time.monotonic() + 5
        while '"decision":"deny"' not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)  # the writer flushes about four times a second
        log = srv.log()
    entries = [e for e in json_lines(log) if "schema_version" in e]
    assert [e["principal"] for e in entries] == [STRANGER]
    assert entries[0]["trace_id"] == TRACE and entries[0]["span_id"] is None
    assert not [e for e in json_lines(log) if "parent_id" in e]  # no span printed


def test_bad_observability_settings_fail_at_start(policy_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    for args, needle in (
        (["--decision-log-sample-allowed", "2"], "decision_log_sample_allowed"),
        (["--decision-log", str(tmp_path / "no" / "such" / "dir.log")], "decision_log"),
        (["--metrics-listen", "nonsense"], "listen"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
             "--listen", f"127.0.0.1:{free_port()}", *args],
            capture_output=True, text=True, timeout=30, cwd=REPO)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr, (args, out.stderr)
