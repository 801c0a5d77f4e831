"""`extauthz doctor --admin` against real running Envoys.

1. The e2e stack's Envoy (the shipped sidecar config) read over its admin interface: clean.
2. The bypass issue 17 reports, reproduced live: the same stack behind a second real Envoy
   whose `/health` route has ext_authz disabled with a `prefix` match. A workload no policy
   mentions reaches the upstream on `/healthcare/patients/42` through that Envoy (so the bypass
   is real), and `doctor --admin` on that Envoy reports exactly that route, with that path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.devstack.certs import Credential
from extauthz.devstack.stack import DevStack, find_envoy

from .conftest import ORDERS

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"


def _doctor(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", "doctor", *argv],
                          capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def _admin_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return str(resp.read().decode())


def test_doctor_reads_the_live_sidecar_and_finds_it_clean(
    stack: DevStack, policy_dir: Path
) -> None:
    proc = _doctor("--admin", f"http://127.0.0.1:{stack.admin_port}", "--policy",
                   str(policy_dir), "--fail-on", "info")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"extauthz doctor: http://127.0.0.1:{stack.admin_port}/config_dump" in proc.stdout
    assert "read: an admin /config_dump with 1 listener, 2 clusters" in proc.stdout
    assert proc.stdout.endswith("no findings\n")


@pytest.fixture(scope="module")
def exempt_envoy(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """A second real Envoy: the stack's own bootstrap plus `prefix: /health` exempt first."""
    work = tmp_path_factory.mktemp("exempt-envoy")
    doc: dict[str, Any] = yaml.safe_load(stack.bootstrap_path.read_text(encoding="utf-8"))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    [authz] = [f["name"] for f in hcm["http_filters"] if "ext_authz" in f["name"]]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    health = copy.deepcopy(vhost["routes"][-1])
    health["match"] = {"prefix": "/health"}
    health.pop("name", None)
    health["typed_per_filter_config"] = {authz: {"@type": _PER_ROUTE, "disabled": True}}
    vhost["routes"].insert(0, health)
    config = work / "envoy.yaml"
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    admin_path = work / "admin.address"
    log = (work / "envoy.log").open("wb")
    proc = subprocess.Popen(  # stopped below by its own PID
        [find_envoy(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
         "-l", "warning", "--admin-address-path", str(admin_path)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        admin = ""
        while not admin or _ready(int(admin.rpartition(":")[2])) != "LIVE":
            assert proc.poll() is None, (work / "envoy.log").read_text(encoding="utf-8")
            assert time.monotonic() < deadline, "the second Envoy did not become ready"
            with contextlib.suppress(OSError):
                admin = admin_path.read_text(encoding="utf-8").strip()
            time.sleep(0.05)
        admin_port = int(admin.rpartition(":")[2])
        listeners = json.loads(_admin_get(admin_port, "/listeners?format=json"))
        [status] = listeners["listener_statuses"]
        view = copy.copy(stack)  # the same CA, extauthz and upstream; this Envoy's ports
        view.envoy_port = int(status["local_address"]["socket_address"]["port_value"])
        view.admin_port = admin_port
        yield view
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _ready(port: int) -> str:
    try:
        return _admin_get(port, "/ready").strip()
    except OSError:
        return ""


def test_prefix_exemption_is_a_real_bypass_and_doctor_names_it(
    exempt_envoy: DevStack, stranger: Credential, policy_dir: Path
) -> None:
    # The bypass, through real Envoy: no rule mentions the stranger, yet the upstream answers.
    assert exempt_envoy.call(stranger, "GET", ORDERS, "/v1/orders/1").status == 403
    assert exempt_envoy.call(stranger, "GET", ORDERS, "/healthcare/patients/42").status == 200
    # ... and the doctor, reading that Envoy over its admin interface, says exactly that.
    proc = _doctor("--admin", f"http://127.0.0.1:{exempt_envoy.admin_port}", "--policy",
                   str(policy_dir), "--format", "json")
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    [finding] = doc["findings"]
    assert finding["id"] == "route.ext_authz_disabled"
    assert finding["path"].startswith("$.configs[")
    assert "route #1 'prefix /health'" in finding["detail"]
    assert "/healthcare/x" in finding["detail"] and "/health-admin/x" in finding["detail"]
