"""Reload under load: the real server answers every check while its policy is rewritten.

Threads send gRPC Checks to a real `python -m extauthz serve` while another thread swaps the
policy between two good versions (with different answers) and several broken ones, by
polling and by SIGHUP. Every answer must be a real decision that matches exactly the policy
version it names in its dynamic metadata; broken versions never serve; health stays SERVING.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from extauthz.sources.policy_store import load_policy

from .server_process import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
CLIENT = "spiffe://prod.example/ns/reload/sa/client"
BILLING = "spiffe://prod.example/ns/finance/sa/billing"  # no rate limit declared
HEAD = "apiVersion: extauthz/v1\nowner: t\nservice: reload\nhosts: [reload.mesh.local]\nrules:\n"
GOOD = {
    # version A: the client may read; version B: it may not (another caller may).
    "a": HEAD + f"  - name: reload-a\n    methods: [GET]\n    path_prefix: /x\n    allow: ['{CLIENT}']\n",
    "b": HEAD + "  - name: reload-b\n    methods: [GET]\n    path_prefix: /x\n"
                "    allow: ['spiffe://prod.example/ns/reload/sa/other']\n",
}
BROKEN = [
    "apiVersion: extauthz/v1\nrules: [\n",  # invalid YAML
    HEAD + "  - name: reload-c\n    path_prefix: /x\n    allow: [ghost]\n",  # unknown principal
    HEAD + "  - name: reload-d\n    path_regex: '(?=x)'\n    allow: ['*']\n",  # not RE2
    HEAD + "  - name: reload-e\n    path: /x\n    allow: ['*']\n    when: 'size(headers) > 0'\n",
]
DURATION = 8.0


def write_atomically(directory: Path, text: str) -> None:
    tmp = directory / ".reload.yaml.tmp"  # hidden: never read as a policy
    tmp.write_text(text)
    os.replace(tmp, directory / "reload.yaml")


def versions(policy_dir: Path, tmp: Path) -> dict[str, str]:
    """policy_version -> variant, computed exactly as the server will (content hash)."""
    out = {}
    for name, text in GOOD.items():
        d = tmp / f"v-{name}"
        shutil.copytree(policy_dir, d)
        (d / "reload.yaml").write_text(text)
        out[load_policy(d).version] = name
    return out


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def request(principal: str, host: str, path: str) -> ea.CheckRequest:
    req = ea.CheckRequest()
    req.attributes.source.principal = principal
    http = req.attributes.request.http
    http.method, http.host, http.path = "GET", host, path
    http.headers["x-request-id"] = "load"
    return req


def test_reload_under_load_never_fails_or_answers_wrong(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policy"
    shutil.copytree(REPO / "policy", policy_dir)
    write_atomically(policy_dir, GOOD["a"])
    known = versions(policy_dir, tmp_path)
    assert len(known) == 2
    answers: list[tuple[str, str, bool, str]] = []  # (which probe, version, allowed, rule)
    errors: list[str] = []
    stop = threading.Event()

    metrics_port = free_port()
    extra = ["--watch-interval", "0.1", "--metrics-listen", f"127.0.0.1:{metrics_port}"]
    with running_server(policy_dir, tmp_path, extra=extra) as srv:
        def load() -> None:
            probes = [("reload", request(CLIENT, "reload.mesh.local", "/x/1")),
                      ("orders", request(BILLING, "orders.mesh.local", "/v1/orders/1"))]
            with grpc.insecure_channel(srv.target) as ch:
                stub = ea_grpc.AuthorizationStub(ch)
                i = 0
                while not stop.is_set():
                    which, req = probes[i % 2]
                    i += 1
                    try:
                        resp = stub.Check(req, timeout=5)
                    except grpc.RpcError as exc:
                        errors.append(f"{exc.code()}: {exc.details()}")
                        continue
                    meta = resp.dynamic_metadata
                    answers.append((which, meta["policy_version"], resp.HasField("ok_response"),
                                    meta["rule"]))

        def rewrite() -> None:
            cycle = ["b", 0, "a", 1, "b", 2, "a", 3]
            i = 0
            deadline = time.monotonic() + DURATION
            while time.monotonic() < deadline:
                step = cycle[i % len(cycle)]
                write_atomically(policy_dir, GOOD[step] if isinstance(step, str) else BROKEN[step])
                if i % 3 == 0:
                    srv.proc.send_signal(signal.SIGHUP)
                i += 1
                time.sleep(0.25)
            stop.set()

        threads = [threading.Thread(target=load) for _ in range(4)]
        writer = threading.Thread(target=rewrite)
        for t in [*threads, writer]:
            t.start()
        writer.join(DURATION + 10)
        for t in threads:
            t.join(15)
        assert srv.health() == health_pb2.HealthCheckResponse.SERVING
        assert srv.health("envoy.service.auth.v3.Authorization") == health_pb2.HealthCheckResponse.SERVING
        metrics = scrape(metrics_port)
        log = srv.log()

    assert errors == []
    assert len(answers) > 200
    seen = {version for _, version, _, _ in answers}
    assert seen <= set(known), f"served unknown versions {seen - set(known)}"
    assert seen == set(known), "both good versions should have served"
    expected = {"a": (True, "reload-a"), "b": (False, "reload-b")}
    for which, version, allowed, rule in answers:
        if which == "orders":
            assert (allowed, rule) == (True, "orders-read")
        else:
            assert (allowed, rule) == expected[known[version]], (version, allowed, rule)
    failures = log.count('"event": "policy_reload_failed"')
    assert failures >= 3
    assert metrics["extauthz_policy_reload_failures_total"] == failures  # one per rejected version
    assert metrics["extauthz_policy_reloads_total"] == log.count('"event": "policy_loaded"')
    assert metrics["extauthz_policy_loaded"] == 1
    assert next(k for k in metrics if k.startswith("extauthz_policy_info{"))[21:-1] in known
    assert log.count('"event": "policy_loaded"') >= 5  # initial load + several swaps
    assert "Traceback" not in log
