"""Every decision visible by principal, end to end: caller -> Envoy -> extauthz -> upstream.

One stack of our own (extauthz with console spans, a decision-log file and a metrics endpoint). Checks that Envoy's access log names the principal extauthz
decided on, that a request sent with a `traceparent` gets an extauthz span that is its child,
and that the decision log and metrics say the same thing.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from extauthz.devstack.stack import DevStack, call

from .conftest import CHECKOUT, ORDERS, STRANGER, TRUST_DOMAIN, _require_envoy

HEADER = "x-extauthz-principal"  # the default --principal-header
TRACE = uuid.uuid4().hex
PARENT = uuid.uuid4().hex[:16]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def obs_stack(tmp_path_factory: pytest.TempPathFactory, policy_dir: Path) -> Iterator[DevStack]:
    _require_envoy()
    work = tmp_path_factory.mktemp("obs-stack")
    port = _free_port()
    s = DevStack(
        policy_dir,
        trust_domain=TRUST_DOMAIN,
        workdir=work,
        serve_args=("--decision-log", str(work / "decisions.log"),
                    "--metrics-listen", f"127.0.0.1:{port}"),
        env={"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "50"},
    )
    s.metrics_port = port  # type: ignore[attr-defined]
    with s:
        yield s
    assert s.exit_codes == {"envoy": 0, "extauthz": 0}, s.logs()


def _wait(what: str, found: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@pytest.mark.e2e
def test_envoy_access_log_span_and_decision_log_agree_on_the_principal(
    obs_stack: DevStack,
) -> None:
    stack = obs_stack
    checkout = stack.issue_svid(CHECKOUT)
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(stack, checkout, "GET", ORDERS, path,
                headers={"traceparent": f"00-{TRACE}-{PARENT}-01", HEADER: "spoofed"})
    assert resp.status == 200, (resp, stack.logs())

    # The upstream got the principal extauthz decided on, never the caller's copy.
    [seen] = [r for r in stack.upstream.requests if r.path == path]
    assert seen.headers.get(HEADER) == CHECKOUT

    # Envoy's access log line names the principal (ext_authz dynamic metadata).
    entry = _wait("the Envoy access-log line",
                  lambda: [e for e in stack.access_log() if e.get("path") == path])[0]
    assert entry["principal"] == CHECKOUT and entry["status"] in (200, "200")

    # extauthz's span (console exporter: one JSON per line in its stdout) is the child.
    def spans() -> list[dict[str, Any]]:
        return [e for e in _json_lines(stack.extauthz_log_path)
                if e.get("context", {}).get("trace_id") == f"0x{TRACE}"]

    [span] = _wait("the extauthz span", spans)
    assert span["parent_id"] == f"0x{PARENT}"
    assert span["kind"] == "SpanKind.SERVER"
    assert span["attributes"]["enduser.id"] == CHECKOUT
    assert span["attributes"]["extauthz.decision"] == "allow"
    assert span["attributes"]["url.path"] == path
    assert span["attributes"]["extauthz.identity_source"] == "mtls"

    # The decision log line carries the same trace and span.
    decisions = Path(str(stack.workdir)) / "decisions.log"
    [line] = _wait("the decision-log line",
                   lambda: [e for e in _json_lines(decisions) if e.get("path") == path])
    assert line["principal"] == CHECKOUT and line["decision"] == "allow"
    assert line["trace_id"] == TRACE
    assert f"0x{line['span_id']}" == span["context"]["span_id"]
    # The route Envoy named in the check (context_extensions) is the one in its access log.
    assert line["route"] == entry["route"] and line["route"]
    assert span["attributes"]["extauthz.route"] == entry["route"]


@pytest.mark.e2e
def test_b3_headers_through_envoy_make_the_span_a_child_too(obs_stack: DevStack) -> None:
    stack = obs_stack
    trace, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(stack, stack.issue_svid(CHECKOUT), "GET", ORDERS, path,
                headers={"x-b3-traceid": trace, "x-b3-spanid": parent, "x-b3-sampled": "1"})
    assert resp.status == 200, resp

    def spans() -> list[dict[str, Any]]:
        return [e for e in _json_lines(stack.extauthz_log_path)
                if e.get("context", {}).get("trace_id") == f"0x{trace}"]

    [span] = _wait("the extauthz span", spans)
    assert span["parent_id"] == f"0x{parent}"
    assert span["attributes"]["url.path"] == path
    # An unsampled B3 parent: no span, but the log line still names the caller's trace.
    unsampled = uuid.uuid4().hex
    path2 = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(stack, stack.issue_svid(CHECKOUT), "GET", ORDERS, path2,
                headers={"x-b3-traceid": unsampled, "x-b3-spanid": parent, "x-b3-sampled": "0"})
    assert resp.status == 200, resp
    decisions = Path(str(stack.workdir)) / "decisions.log"
    [line] = _wait("the decision-log line",
                   lambda: [e for e in _json_lines(decisions) if e.get("path") == path2])
    assert line["trace_id"] == unsampled and line["span_id"] is None
    assert not [e for e in _json_lines(stack.extauthz_log_path)
                if e.get("context", {}).get("trace_id") == f"0x{unsampled}"]


@pytest.mark.e2e
def test_a_denial_is_visible_by_principal_in_every_output(obs_stack: DevStack) -> None:
    stack = obs_stack
    stranger = stack.issue_svid(STRANGER)
    path = f"/v1/orders/{uuid.uuid4().hex[:12]}"
    resp = call(stack, stranger, "GET", ORDERS, path)
    assert resp.status == 403, resp
    entry = _wait("the Envoy access-log line",
                  lambda: [e for e in stack.access_log() if e.get("path") == path])[0]
    assert entry["principal"] == STRANGER
    assert entry["authz_reason"] == resp.headers["x-extauthz-reason"]
    decisions = Path(str(stack.workdir)) / "decisions.log"
    [line] = _wait("the decision-log line",
                   lambda: [e for e in _json_lines(decisions) if e.get("path") == path])
    assert (line["principal"], line["status"], line["reason"]) == \
        (STRANGER, 403, resp.headers["x-extauthz-reason"])
    port = stack.metrics_port  # type: ignore[attr-defined]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    # The stranger is not declared by the policy: counted as "unknown", never by raw ID.
    assert 'extauthz_principal_checks_total{decision="deny",principal="unknown"' in text
    assert STRANGER not in text
