"""docs/troubleshooting.md, run as an operator would: its commands, verbatim, against a real
Envoy sidecar and a real `extauthz serve` with the repository's example policy.

The only substitutions are the ones a reader makes for their own host: the sidecar's port
(`--connect-to` maps the doc's `orders.mesh.local:10000` to the test's Envoy) and, for the
doctor's admin example, the admin port. Every `# output` line the doc shows must appear in the
real output, and every decision-log field step 4 names must be in the real log line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.devstack.certs import PemPaths, write_pem
from extauthz.devstack.stack import DevStack
from tests.docblocks import REPO, Block, Command, block

CALLER = "spiffe://prod.example/ns/shop/sa/cart"
DEMO_CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"  # docs/observability.md's example
DOC = "docs/troubleshooting.md"


class _MeshStack(DevStack):
    """The dev stack with a server certificate for the doc's host names (*.mesh.local)."""

    def _make_certs(self, certs: Path) -> None:
        super()._make_certs(certs)
        self.server_cert: PemPaths = write_pem(
            certs, "server", self.ca.issue_server_cert(dns_names=("*.mesh.local", "localhost")))


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, Path]]:
    work = tmp_path_factory.mktemp("walk")
    shutil.copytree(REPO / "policy", work / "policy")
    shutil.copytree(REPO / "policy", work / "policies")  # docs/doctor.md's name for it
    stack = _MeshStack(work / "policy", trust_domain="prod.example", workdir=work / "stack",
                       serve_args=["--decision-log", str(work / "decisions.log")])
    with stack:
        write_pem(work, "client", stack.issue_svid(CALLER))
        shutil.copy(stack.ca_path, work / "ca.crt")
        yield stack, work
    assert stack.exit_codes == {"envoy": 0, "extauthz": 0}, stack.logs()


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)  # `extauthz` as installed beside this Python
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def assert_shows(command: Command, out: subprocess.CompletedProcess[str]) -> None:
    """Each output line the doc shows under the command is in the real output."""
    real = _squash(out.stdout)
    for line in command.output:
        assert _squash(line) in real, f"doc shows {line!r}; real output:\n{out.stdout}{out.stderr}"


def only(b: Block) -> Command:
    assert len(b.commands) == 1, b.text
    return b.commands[0]


def wait_logged(work: Path, principal: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    log = work / "decisions.log"
    while time.monotonic() < deadline:
        if log.exists() and f'"principal":"{principal}"' in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no decision for {principal} logged within {timeout}s")


def test_step_1_the_caller_sees_the_documented_status_and_reason(walk: tuple[DevStack, Path]) -> None:
    stack, work = walk
    command = only(block(DOC, "curl -si"))
    assert "orders.mesh.local:10000" in command.line
    local = command.line.replace(
        "curl -si", f"curl -si --connect-to orders.mesh.local:10000:127.0.0.1:{stack.envoy_port}", 1)
    out = run(local, work)
    assert out.returncode == 0, out.stderr
    assert command.output, "the doc shows what the caller gets"
    assert_shows(command, out)


def test_step_4_grep_and_jq_find_the_decision_with_every_field_the_doc_names(
        walk: tuple[DevStack, Path]) -> None:
    stack, work = walk
    stack.call(stack.issue_svid(CALLER), "GET", "orders.mesh.local", "/v1/orders")
    wait_logged(work, CALLER)
    grep = only(block(DOC, "grep "))
    out = run(grep.line, work)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines and all(entry["principal"] == CALLER for entry in lines)
    entry = lines[-1]
    assert (entry["status"], entry["reason"], entry["rule"]) == (403, "principal_not_allowed",
                                                                 "orders-read")
    text = (REPO / DOC).read_text()
    step4 = text[text.index("## 4."):text.index("```sh", text.index("## 4."))]
    named = set(re.findall(r"`([a-z_]+)`", step4))
    assert {"principal", "reason", "rule", "policy_version"} <= named
    assert named <= set(entry), f"documented but never written: {sorted(named - set(entry))}"
    jq = only(block(DOC, "jq -c"))
    out = run(jq.line, work)
    assert out.returncode == 0, out.stderr
    picked = json.loads(out.stdout.splitlines()[-1])
    assert picked["reason"] == "principal_not_allowed" and picked["path"] == "/v1/orders"


def test_step_5_check_explain_reproduces_the_denial_offline(walk: tuple[DevStack, Path]) -> None:
    _, work = walk
    command = only(block(DOC, "extauthz check"))
    out = run(command.line, work)
    assert out.returncode == 1, out.stderr  # a denial
    assert "Traceback" not in out.stderr
    assert_shows(command, out)


def test_observability_jq_recipes_run_on_the_real_decision_log(walk: tuple[DevStack, Path]) -> None:
    stack, work = walk
    foreign = stack.ca.issue_svid(DEMO_CHECKOUT, allow_foreign_trust_domain=True)
    assert stack.call(foreign, "GET", "orders.mesh.local", "/v1/orders").status == 403
    wait_logged(work, DEMO_CHECKOUT)
    recipes = block("docs/observability.md", "jq -c").commands
    denied = run(recipes[0].line, work)
    assert denied.returncode == 0, denied.stderr
    assert all(json.loads(line)["principal"] == DEMO_CHECKOUT
               for line in denied.stdout.splitlines()) and denied.stdout
    counted = run(recipes[1].line, work)
    assert counted.returncode == 0 and DEMO_CHECKOUT in counted.stdout, counted.stderr
    dry = run(recipes[2].line, work)
    assert dry.returncode == 0, dry.stderr  # no dry-run rule matched: empty, but it runs


def test_doctor_admin_recipe_runs_against_the_real_sidecar(walk: tuple[DevStack, Path]) -> None:
    stack, work = walk
    commands = block("docs/doctor.md", "extauthz doctor --admin").commands
    for command in commands:
        local = command.line.replace("127.0.0.1:9901", f"127.0.0.1:{stack.admin_port}")
        out = run(local, work)
        assert out.returncode == 0, (command.line, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
    sarif = json.loads((work / "doctor.sarif").read_text())
    assert sarif["runs"], sarif
    readme = [c for c in block("README.md", "extauthz envoy-config ").commands
              if "--admin" in c.line]
    for command in readme:  # README's doctor of a running Envoy, against the real sidecar
        local = (command.line.replace("127.0.0.1:9901", f"127.0.0.1:{stack.admin_port}")
                 .replace("/etc/extauthz/policy", str(work / "policy")))
        out = run(local, work)
        assert out.returncode == 0, (command.line, out.stdout, out.stderr)
    assert readme
