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


# -- real credentials: a signed JWT and a peer certificate never reach any output -----------

IDP = "https://login.prod.example"


def _jwt_material(tmp_path: Path) -> tuple[Any, str, dict[str, Any]]:
    """An ES256 key, its JWKS file, and the public JWK (whose coordinates must not leak)."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    return key, str(path), jwk


def _token(key: Any, sub: str) -> str:
    import jwt as pyjwt

    now = int(time.time())
    return pyjwt.encode({"iss": IDP, "sub": sub, "aud": "orders", "iat": now, "exp": now + 300,
                         "jti": "jti-" + sub[:8]}, key, algorithm="ES256",
                        headers={"kid": "k1"})


def check_full(target: str, *, principal: str = "", certificate: str = "",
               path: str = "/v1/orders/1", headers: dict[str, str] | None = None,
               route: str = "") -> ea.CheckResponse:
    req = ea.CheckRequest()
    req.attributes.source.principal = principal
    req.attributes.source.certificate = certificate
    if route:
        req.attributes.context_extensions["route"] = route
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", path
    http.headers.update(headers or {})
    with grpc.insecure_channel(target) as ch:
        return ea_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def test_a_real_jwt_and_peer_certificate_never_reach_spans_logs_or_metrics(
    policy_dir: Path, tmp_path: Path
) -> None:
    from urllib.parse import quote

    from extauthz.devstack.certs import CertificateAuthority

    key, jwks_file, jwk = _jwt_material(tmp_path)
    token = _token(key, "batch-job")
    evil_sub = "job\r\nX-Injected: 1\r\n{\"decision\":\"allow\"}\x00" + "A" * 1800
    evil = _token(key, evil_sub)
    svid = CertificateAuthority.create("prod.example").issue_svid(CHECKOUT)
    cert_pem = svid.cert_pem.decode()
    cert_body = "".join(cert_pem.strip().splitlines()[1:-1])  # the base64 DER
    config = tmp_path / "extauthz.yaml"
    config.write_text(json.dumps({"trust_domains": ["prod.example"], "identity": {
        "jwt": {"issuers": [{"issuer": IDP, "audiences": ["orders"], "jwks_file": jwks_file}]},
    }}))
    metrics_port = free_port()
    decisions = tmp_path / "decisions.log"
    args = ["--config", str(config), "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--decision-log", str(decisions)]
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    sampled = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    with running_server(policy_dir, tmp_path, args, env) as srv:
        # JWT wins over the (also present) peer certificate: a JWT identity, denied by policy.
        r1 = check_full(srv.target, principal=CHECKOUT, certificate=quote(cert_pem),
                        headers={**sampled, "authorization": f"Bearer {token}",
                                 "cookie": f"session={token}"}, route="orders-api")
        # mTLS with the real certificate checked: allowed.
        r2 = check_full(srv.target, principal=CHECKOUT, certificate=quote(cert_pem),
                        headers=sampled, route="orders-api")
        # A validly signed token whose subject is CRLF-laden, NUL-bearing and ~1.9 KB: refused
        # at verification (it would become a header value), and nothing of it leaks.
        r3 = check_full(srv.target, headers={**sampled, "authorization": f"Bearer {evil}"})
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as resp:
            metrics_text = resp.read().decode()
    assert r1.denied_response.status.code == 403, r1
    assert r2.HasField("ok_response"), r2
    assert r3.denied_response.status.code == 401, r3
    r3_headers = {h.header.key: h.header.value for h in r3.denied_response.headers}
    assert r3_headers["x-extauthz-reason"] == "invalid_identity"
    assert "X-Injected" not in r3_headers["www-authenticate"]
    log_text = srv.log()
    decision_text = decisions.read_text()

    secrets = {"token": token, "evil token": evil, "certificate body": cert_body,
               "certificate (url-encoded)": quote(cert_pem)[:200], "JWK x": jwk["x"],
               "JWK y": jwk["y"], "token signature": token.rsplit(".", 1)[1],
               "token payload": token.split(".")[1]}
    for where, text in (("stdout/stderr", log_text), ("decision log", decision_text),
                        ("metrics", metrics_text)):
        for what, secret in secrets.items():
            assert secret not in text, f"{what} leaked into {where}"
        assert "BEGIN CERTIFICATE" not in text, where
    assert "batch-job" not in metrics_text  # raw JWT subjects are never labels

    # Every line of every output is still one JSON object (no line was split).
    raw_lines = decision_text.splitlines()
    assert len(raw_lines) == 3
    entries = [json.loads(line) for line in raw_lines]
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for entry in entries:
        validator.validate(entry)
    assert (entries[0]["principal"], entries[0]["identity_source"], entries[0]["issuer"]) == \
        ("batch-job", "jwt", IDP)
    assert entries[0]["route"] == "orders-api" and entries[2]["route"] is None
    assert (entries[1]["principal"], entries[1]["identity_source"], entries[1]["decision"]) == \
        (CHECKOUT, "mtls", "allow")
    assert (entries[2]["principal"], entries[2]["status"], entries[2]["identity_source"]) == \
        (None, 401, "jwt")
    assert "X-Injected" not in decision_text
    assert "\r" not in decision_text and "\x00" not in decision_text
    for line in log_text.splitlines():
        if line.strip():
            json.loads(line)  # operational logs and console spans: each line parses
    spans = [e for e in json_lines(log_text) if "context" in e and "parent_id" in e]
    assert len(spans) == 3
    assert {s["attributes"].get("extauthz.route") for s in spans} == {"orders-api", None}
    assert not any("X-Injected" in json.dumps(s) for s in spans)


def test_sampling_zero_still_logs_every_denial_and_every_dry_run(
    policy_dir: Path, tmp_path: Path
) -> None:
    decisions = tmp_path / "decisions.log"
    args = ["--no-tracing", "--decision-log", str(decisions),
            "--decision-log-sample-allowed", "0"]
    with running_server(policy_dir, tmp_path, args) as srv:
        for _ in range(3):
            assert check(srv.target, CHECKOUT) == 200  # allowed: sampled out
        assert check(srv.target, CART, "/v1/audit/x") == 200  # dry-run would deny: kept
        assert check(srv.target, STRANGER) == 403  # denial: kept
        assert check(srv.target, "not-a-spiffe-id") == 401  # denial: kept
    entries = json_lines(decisions.read_text())
    assert [(e["reason"], e["dry_run"]) for e in entries] == [
        ("dry_run_would_deny", True), ("principal_not_allowed", False),
        ("invalid_identity", False)]
