"""Three real server processes sharing one real Redis enforce a single per-principal limit."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

from .server_process import running_server

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = "spiffe://prod.example/ns/shop/sa/checkout"
# Slow refill (one per minute) so the count is exact however slow the machine is.
LIMITED_POLICY = f"""\
apiVersion: extauthz/v1
owner: team-orders
service: orders
hosts: [orders.mesh.local]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
    limit: {{rate: 1, period: 60s, burst: 20}}
rules:
  - name: orders-read
    methods: [GET]
    path_prefix: /v1/orders
    allow: [checkout]
"""


def _check(target: str) -> ea.CheckResponse:
    req = ea.CheckRequest()
    req.attributes.source.principal = CHECKOUT
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", "orders.mesh.local", "/v1/orders/1"
    with grpc.insecure_channel(target) as ch:
        return ea_grpc.AuthorizationStub(ch).Check(req, timeout=5)


def _status(target: str) -> int:
    resp = _check(target)
    return 200 if resp.HasField("ok_response") else int(resp.denied_response.status.code)


def test_three_replicas_share_one_budget_through_redis(redis_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "orders.yaml").write_text(LIMITED_POLICY)
    args = ["--rate-limit-backend", "redis", "--redis-url", redis_url, "--redis-timeout", "0.5"]
    with (
        running_server(policy, tmp_path, extra=args) as a,
        running_server(policy, tmp_path, extra=args) as b,
        running_server(policy, tmp_path, extra=args) as c,
    ):
        targets = [a.target, b.target, c.target]
        answers = [_status(targets[i % 3]) for i in range(30)]
    assert answers.count(200) == 20, answers  # one budget, not one per replica
    assert answers[:20] == [200] * 20 and set(answers[20:]) == {429}


def test_redis_down_fail_closed_answers_503_not_429(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy)
    args = ["--rate-limit-backend", "redis", "--redis-url", "redis://127.0.0.1:1/0",
            "--redis-failure-mode", "closed"]
    with running_server(policy, tmp_path, extra=args) as srv:
        resp = _check(srv.target)
        headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
        assert (resp.denied_response.status.code, resp.status.code) == (503, 14)
        assert headers["x-extauthz-reason"] == "ratelimit_unavailable" and headers["retry-after"] == "1"
        assert "limiter_unavailable" in srv.log()
