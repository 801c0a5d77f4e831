"""Two real server processes sharing one real Redis enforce a single per-principal limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

from .server_process import running_server

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"  # limit: burst 50 in policy/orders.yaml


def _status(target: str) -> int:
    req = ea.CheckRequest()
    req.attributes.source.principal = CHECKOUT
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", "/v1/orders/1"
    with grpc.insecure_channel(target) as ch:
        resp = ea_grpc.AuthorizationStub(ch).Check(req, timeout=5)
    return 200 if resp.HasField("ok_response") else int(resp.denied_response.status.code)


def test_two_replicas_share_one_budget_through_redis(redis_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy)
    args = ["--rate-limit-backend", "redis", "--redis-url", redis_url, "--redis-timeout", "0.5"]
    with running_server(policy, tmp_path, extra=args) as a, running_server(policy, tmp_path, extra=args) as b:
        answers = [_status(a.target if i % 2 else b.target) for i in range(70)]
    # burst 50 at 100/s: the run takes well under 0.2 s, so at most a handful refill
    allowed = answers.count(200)
    assert 50 <= allowed <= 60, answers
    assert set(answers) == {200, 429}


def test_redis_down_fail_closed_answers_503_not_429(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy)
    args = ["--rate-limit-backend", "redis", "--redis-url", "redis://127.0.0.1:1/0",
            "--redis-failure-mode", "closed"]
    with running_server(policy, tmp_path, extra=args) as srv:
        assert _status(srv.target) == 503
        assert "limiter_unavailable" in srv.log()
