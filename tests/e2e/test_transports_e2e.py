"""The same table through real Envoy with real mTLS, once per transport (gRPC and HTTP), and
the two must agree: status, reason, principal seen upstream, upstream headers, client headers,
and the ext_authz dynamic metadata in Envoy's access log.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from extauthz.devstack.certs import Credential
from extauthz.devstack.stack import DevStack, call

from .conftest import CHECKOUT, LIMITED, ORDERS, STRANGER, TRUST_DOMAIN, _require_envoy

REASON = "x-extauthz-reason"
CLIENT_HEADERS = (REASON, "retry-after")
UPSTREAM_HEADERS = ("x-extauthz-principal", "x-extauthz-rule", "x-forwarded-client-cert")
LOG_FIELDS = ("status", "principal", "rule", "policy_version", "authz_reason")

# (name, who, method, path, extra request headers)
Row = tuple[str, str, str, str, dict[str, str]]
TABLE: list[Row] = [
    ("allowed", "checkout", "GET", "/v1/orders/{id}", {}),
    ("allowed-post", "checkout", "POST", "/v1/orders", {}),
    ("spoofed-principal-header-stripped", "checkout", "GET", "/v1/orders/{id}",
     {"x-extauthz-principal": "spiffe://demo.local/ns/admin/sa/root",
      "x-extauthz-rule": "forged"}),
    ("401-no-spiffe-id", "dns_only", "GET", "/v1/orders/{id}", {}),
    ("403-stranger", "stranger", "GET", "/v1/orders/{id}", {}),
    ("403-no-rule", "checkout", "DELETE", "/v1/orders/{id}", {}),
    ("403-method-override", "checkout", "GET", "/v1/orders/{id}",
     {"x-http-method-override": "DELETE"}),
    ("limit-1", "exporter", "GET", "/v1/export/{id}", {}),
    ("limit-2", "exporter", "GET", "/v1/export/{id}", {}),
    ("429", "exporter", "GET", "/v1/export/{id}", {}),
]


def _uri_only(header: str, value: str | None) -> str | None:
    """XFCC's Hash differs between the two stacks (two CAs); its URI must not."""
    if header != "x-forwarded-client-cert" or value is None:
        return value
    return ";".join(p for p in value.split(";") if p.startswith("URI="))


def _run_table(stack: DevStack) -> dict[str, dict[str, Any]]:
    who: dict[str, Credential] = {
        "checkout": stack.issue_svid(CHECKOUT),
        "stranger": stack.issue_svid(STRANGER),
        "exporter": stack.issue_svid(LIMITED),
        "dns_only": stack.ca.issue_dns_only(f"legacy.{TRUST_DOMAIN}"),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, caller, method, template, headers in TABLE:
        marker = uuid.uuid4().hex[:12]
        path = template.format(id=marker)
        resp = call(stack, who[caller], method, ORDERS, path, headers=headers,
                    body=b"{}" if method == "POST" else None)
        seen = [r for r in stack.upstream.requests if r.path == path]
        out[name] = {
            "path": path,
            "status": resp.status,
            "client": {h: resp.headers.get(h) for h in CLIENT_HEADERS},
            "www-authenticate": (resp.headers.get("www-authenticate") or "").split(" ")[0],
            "upstream": ({h: _uri_only(h, seen[-1].headers.get(h)) for h in UPSTREAM_HEADERS}
                         if seen else None),
        }
    # 503 last: extauthz gone, Envoy answers status_on_error (fail closed)
    stack.stop_process("extauthz")
    resp = call(stack, who["checkout"], "GET", ORDERS, "/v1/orders/after-stop")
    out["503-extauthz-down"] = {"path": "/v1/orders/after-stop", "status": resp.status,
                                "client": {}, "www-authenticate": "", "upstream": None}
    deadline = time.monotonic() + 10
    log: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        log = stack.access_log()
        if len(log) >= len(out):
            break
        time.sleep(0.1)
    by_path = {e.get("path"): e for e in log}
    for row in out.values():
        entry = by_path.get(row["path"], {})
        row["log"] = {k: entry.get(k) for k in LOG_FIELDS}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, policy_dir: Path) -> dict[str, Any]:
    _require_envoy()
    runs: dict[str, Any] = {}
    for protocol in ("grpc", "http"):
        stack = DevStack(policy_dir, trust_domain=TRUST_DOMAIN, authz_protocol=protocol,
                         workdir=tmp_path_factory.mktemp(f"stack-{protocol}"),
                         serve_args=("--rule-header", "x-extauthz-rule"))
        with stack:
            runs[protocol] = _run_table(stack)
            runs[protocol + "-logs"] = stack.logs()
        assert stack.exit_codes.get("envoy") == 0, stack.logs()
    return runs


EXPECTED = {
    "allowed": 200, "allowed-post": 200, "spoofed-principal-header-stripped": 200,
    "401-no-spiffe-id": 401, "403-stranger": 403, "403-no-rule": 403,
    "403-method-override": 403, "limit-1": 200, "limit-2": 200, "429": 429,
    "503-extauthz-down": 503,
}


@pytest.mark.e2e
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_each_transport_answers_the_table(results: dict[str, Any], protocol: str) -> None:
    got = {name: row["status"] for name, row in results[protocol].items()}
    assert got == EXPECTED, results[protocol + "-logs"]
    rows = results[protocol]
    allowed = rows["allowed"]["upstream"]
    assert allowed["x-extauthz-principal"] == CHECKOUT
    assert allowed["x-extauthz-rule"] == "read-orders"
    assert allowed["x-forwarded-client-cert"] == f"URI={CHECKOUT}"
    spoofed = rows["spoofed-principal-header-stripped"]["upstream"]
    assert spoofed["x-extauthz-principal"] == CHECKOUT and spoofed["x-extauthz-rule"] == "read-orders"
    assert rows["401-no-spiffe-id"]["client"][REASON] == "invalid_identity"
    assert rows["401-no-spiffe-id"]["www-authenticate"] == "mTLS"
    assert rows["403-method-override"]["client"][REASON] == "method_override"
    assert int(rows["429"]["client"]["retry-after"]) >= 1
    for name, row in rows.items():
        if row["status"] != 200:
            assert row["upstream"] is None, name  # a denial never reaches the upstream
    assert rows["allowed"]["log"]["principal"] == CHECKOUT
    assert rows["allowed"]["log"]["rule"] == "read-orders"
    assert rows["403-stranger"]["log"]["principal"] == STRANGER
    assert rows["403-stranger"]["log"]["authz_reason"] == "principal_not_allowed"


@pytest.mark.e2e
def test_grpc_and_http_transports_agree_row_by_row(results: dict[str, Any]) -> None:
    grpc_rows, http_rows = results["grpc"], results["http"]
    strip: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: {  # noqa: E731
        k: v for k, v in row.items() if k != "path"}
    for name in EXPECTED:
        assert strip(http_rows[name]) == strip(grpc_rows[name]), name


@pytest.mark.e2e
def test_http_transport_over_a_unix_socket(tmp_path: Path, policy_dir: Path) -> None:
    """The sidecar setup the docs recommend: extauthz on a unix socket (its file mode the
    access control), Envoy's HTTP ext_authz client on the other end."""
    _require_envoy()
    stack = DevStack(policy_dir, trust_domain=TRUST_DOMAIN, authz_protocol="http",
                     extauthz_transport="unix", workdir=tmp_path / "stack")
    with stack:
        assert stack.extauthz_target.startswith("unix:")
        checkout = stack.issue_svid(CHECKOUT)
        allowed = call(stack, checkout, "GET", ORDERS, "/v1/orders/unix-1")
        denied = call(stack, stack.issue_svid(STRANGER), "GET", ORDERS, "/v1/orders/unix-2")
        assert allowed.status == 200, stack.logs()
        assert denied.status == 403 and denied.headers.get(REASON) == "principal_not_allowed"
    assert stack.exit_codes == {"envoy": 0, "extauthz": 0}, stack.logs()
