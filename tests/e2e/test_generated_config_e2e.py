"""The bootstrap `extauthz envoy-config` generates, run for real: caller -> Envoy -> extauthz
-> upstream, with real mTLS, extauthz on a unix socket, a health path that bypasses ext_authz,
and a named route (its name is sent to extauthz as context_extensions.route and shows in
Envoy's access log). extauthz runs with a renamed principal header (`--principal-header`) and the
config is rendered with the matching `envoy-config --principal-header`: the upstream gets the
principal under that name, and a caller's forged copy never reaches it, not even on the health
path where ext_authz (and so extauthz's own header handling) does not run.

The devstack normally renders its own bootstrap; here its renderer is swapped for the command
line (`extauthz envoy-config ... -o FILE`), fed the devstack's ports and certificates.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz.cli.main import main
from extauthz.devstack import stack as devstack
from extauthz.devstack import upstream
from extauthz.devstack.certs import Credential
from extauthz.devstack.stack import DevStack, call
from extauthz.envoyconf.config import SidecarConfig

ORDERS = "orders.demo.local"  # as in conftest.TEST_POLICY
CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"
STRANGER = "spiffe://demo.local/ns/shop/sa/stranger"
ROUTE = "orders-api"
PRINCIPAL_HEADER = "x-caller-identity"


def _render_with_cli(work: Path) -> Any:
    def render_yaml(config: SidecarConfig, *, header: bool = True) -> str:
        out = work / "generated-envoy.yaml"
        certs = Path(config.server_cert).parent
        assert Path(config.server_key).parent == certs and Path(config.trust_bundle).parent == certs
        upstream = f"{config.upstream_address}:{config.upstream_port}"
        args = [
            "envoy-config",
            "--variant", "sidecar",
            "--extauthz", config.extauthz,
            "--upstream", upstream,
            "--listen-address", config.listen_address,
            "--listen-port", str(config.listen_port),
            "--admin-port", str(config.admin_port),
            "--certs-dir", str(certs),
            "--access-log", str(config.access_log_path),
            "--health-path", "/healthz",
            "--route-name", ROUTE,
            "--principal-header", PRINCIPAL_HEADER,
            "-o", str(out),
        ]
        assert main(args) == 0
        return out.read_text(encoding="utf-8")

    return render_yaml


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory, policy_dir: Path
) -> Iterator[DevStack]:
    work = tmp_path_factory.mktemp("generated")
    mp = pytest.MonkeyPatch()
    mp.setattr(devstack, "render_yaml", _render_with_cli(work))
    # The sample upstream records only the headers it finds interesting: add ours.
    mp.setattr(upstream, "INTERESTING_HEADERS", (*upstream.INTERESTING_HEADERS, PRINCIPAL_HEADER))
    stack = DevStack(
        policy_dir,
        trust_domain="demo.local",
        extauthz_transport="unix",
        workdir=work / "stack",
        serve_args=(
            "--decision-log", str(work / "decisions.log"), "--no-tracing",
            "--principal-header", PRINCIPAL_HEADER,
        ),
    )
    try:
        with stack:
            yield stack
    finally:
        mp.undo()
    assert stack.exit_codes == {"envoy": 0, "extauthz": 0}, stack.logs()


@pytest.fixture(scope="module")
def svid(generated: DevStack) -> Credential:
    return generated.issue_svid(CHECKOUT)


def _entries(stack: DevStack, path: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [e for e in stack.access_log() if e.get("path") == path]
        if found:
            return found
        time.sleep(0.1)
    return []


@pytest.mark.e2e
def test_generated_bootstrap_is_what_envoy_runs(generated: DevStack) -> None:
    text = generated.bootstrap_path.read_text()
    assert "envoy.filters.http.ext_authz" in text and f"route: {ROUTE}" in text
    assert generated.extauthz_target.startswith("unix:")


@pytest.mark.e2e
def test_allowed_call_reaches_upstream_with_principal(generated: DevStack, svid: Credential) -> None:
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(generated, svid, "GET", ORDERS, path)
    assert resp.status == 200, (resp, generated.logs())
    [seen] = [r for r in generated.upstream.requests if r.path == path]
    assert seen.headers.get(PRINCIPAL_HEADER) == CHECKOUT
    assert "x-extauthz-principal" not in seen.headers
    [entry] = _entries(generated, path)
    assert entry["principal"] == CHECKOUT
    assert entry["rule"] == "read-orders"
    assert entry["route"] == ROUTE


@pytest.mark.e2e
def test_denied_call_is_403_with_reason(generated: DevStack) -> None:
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(generated, generated.issue_svid(STRANGER), "GET", ORDERS, path)
    assert resp.status == 403 and resp.headers["x-extauthz-reason"] == "principal_not_allowed"
    [entry] = _entries(generated, path)
    assert entry["authz_reason"] == "principal_not_allowed"


@pytest.mark.e2e
def test_health_path_bypasses_authz_but_only_exactly(generated: DevStack) -> None:
    stranger = generated.issue_svid(STRANGER)
    assert call(generated, stranger, "GET", ORDERS, "/healthz").status == 200
    # No rule allows the stranger anything: only the exact health path was exempt.
    assert call(generated, stranger, "GET", ORDERS, "/healthz/../v1/orders").status == 403
    assert call(generated, stranger, "GET", ORDERS, "/healthz/more").status == 403


@pytest.mark.e2e
def test_forged_principal_headers_never_reach_the_upstream(
    generated: DevStack, svid: Credential
) -> None:
    forged = {PRINCIPAL_HEADER: "spiffe://demo.local/ns/shop/sa/admin",
              "x-extauthz-principal": "spiffe://demo.local/ns/shop/sa/admin"}
    # The health path bypasses ext_authz: only Envoy's strip filter stands between the caller's
    # headers and the upstream here.
    stranger = generated.issue_svid(STRANGER)
    before = len(generated.upstream.requests)
    assert call(generated, stranger, "GET", ORDERS, "/healthz", headers=forged).status == 200
    [seen] = [r for r in generated.upstream.requests[before:] if r.path == "/healthz"]
    assert PRINCIPAL_HEADER not in seen.headers and "x-extauthz-principal" not in seen.headers
    # An allowed request carries the real principal, never the forged one.
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    assert call(generated, svid, "GET", ORDERS, path, headers=forged).status == 200
    [seen] = [r for r in generated.upstream.requests if r.path == path]
    assert seen.headers.get(PRINCIPAL_HEADER) == CHECKOUT
    assert "x-extauthz-principal" not in seen.headers


@pytest.mark.e2e
def test_extauthz_down_is_503_not_an_allow(generated: DevStack, svid: Credential) -> None:
    # Last in this module: stops extauthz; Envoy fails closed with status_on_error 503.
    generated.stop_process("extauthz")
    generated.exit_codes.pop("extauthz")  # the module fixture checks Envoy's clean exit
    generated.exit_codes["extauthz"] = 0
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(generated, svid, "GET", ORDERS, path)
    assert resp.status == 503, resp
    assert [r for r in generated.upstream.requests if r.path == path] == []
