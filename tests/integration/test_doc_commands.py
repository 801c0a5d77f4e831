"""The shell blocks of README.md and docs/operations.md, run as a reader would.

Substitutions are only those a reader makes for their own host (the folders of
/etc/extauthz and /run/svid become temporary ones, the port a free one); see
tests/unit/test_doc_commands.py for the list of every block and who runs it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from extauthz.devstack.certs import CertificateAuthority, write_pem
from tests.docblocks import REPO, block, transcripts

from .server_process import free_port


def run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def serve_and_drain(command: str, cwd: Path) -> None:
    """Run a documented `extauthz serve` until it logs "serving", then SIGTERM: exit 0."""
    log = cwd / "serve.log"
    bindir = str(Path(sys.executable).parent)
    with log.open("wb") as sink:
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, stdout=sink,
                                stderr=subprocess.STDOUT,
                                env={"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(cwd)})
    try:
        deadline = time.monotonic() + 30
        while '"event":"serving"' not in log.read_text().replace(" ", ""):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def test_readme_wiring_commands_render_a_config_the_doctor_passes(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policy", tmp_path / "policy")
    commands = [c for c in block("README.md", "extauthz envoy-config ").commands
                if "--admin" not in c.line]  # needs a running Envoy: the e2e walk-through
    assert len(commands) == 3
    outputs = []
    for command in commands:
        out = run(command.line.replace("/etc/extauthz/policy", str(tmp_path / "policy")), tmp_path)
        assert out.returncode == 0, (command.line, out.stdout, out.stderr)
        outputs.append(out.stdout)
    bootstrap = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    assert bootstrap["static_resources"]["listeners"]
    assert yaml.safe_load(outputs[1])  # the filters, as YAML to paste
    assert "no findings" in outputs[2]


def test_operations_envoy_config_variants_all_render(tmp_path: Path) -> None:
    commands = block("docs/operations.md", "extauthz envoy-config ").commands
    assert len(commands) == 5
    for command in commands:
        out = run(command.line, tmp_path)
        assert out.returncode == 0, (command.line, out.stderr)
        assert yaml.safe_load(out.stdout), command.line


def test_operations_mutual_tls_serve_command_serves_and_drains(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("prod.example")
    svid = tmp_path / "svid"
    server = write_pem(svid, "svid", ca.issue_svid("spiffe://prod.example/ns/mesh/sa/extauthz"))
    server.cert.rename(svid / "svid.pem")
    (svid / "bundle.pem").write_bytes(ca.cert_pem)
    shutil.copytree(REPO / "policy", tmp_path / "policy")
    port = free_port()
    (command,) = block("docs/operations.md",
                       "extauthz serve --policy /etc/extauthz/policy --listen 0.0.0.0").commands
    local = (command.line.replace("/etc/extauthz/policy", str(tmp_path / "policy"))
             .replace("/run/svid", str(svid)).replace("0.0.0.0:9191", f"127.0.0.1:{port}"))
    serve_and_drain(local, tmp_path)


# Commands of docs/policy.md's transcripts that illustrate files the repository does not have.
TRANSCRIPT_SKIPS = {
    "extauthz validate bad/": "bad/ is an illustration; tests/unit/test_policy_lint.py checks "
    "each finding",
    "extauthz test broken/": "broken/ is an illustration; tests/unit/test_policy_tools.py "
    "checks the failure format",
    "python bench/policy_scale.py": "a benchmark's timings",
}


def test_policy_md_transcripts_print_exactly_what_the_doc_shows() -> None:
    ran = 0
    for b in transcripts(REPO / "docs/policy.md"):
        last_rc: int | None = None
        for command in b.commands:
            shown = list(command.output)
            while shown and not shown[-1].strip():
                shown.pop()
            if command.line in TRANSCRIPT_SKIPS:
                last_rc = None
                continue
            if command.line == "echo $?":
                if last_rc is not None:
                    assert shown == [str(last_rc)], (b.lineno, shown)
                continue
            out = run(command.line, REPO)
            last_rc = out.returncode
            assert "Traceback" not in out.stderr
            assert out.stdout.rstrip("\n").splitlines() == shown, (command.line, out.stdout)
            ran += 1
    assert ran == 4


def test_operations_http_transport_wiring_serves_and_renders(tmp_path: Path) -> None:
    shutil.copytree(REPO / "policy", tmp_path / "policy")
    run_dir = tmp_path / "run"
    (run_dir / "extauthz").mkdir(parents=True)
    serve, render = block("docs/operations.md",
                          "extauthz serve --policy /etc/extauthz/policy --http-listen").commands
    local = {"/etc/extauthz/policy": str(tmp_path / "policy"), "/run/": f"{run_dir}/"}

    def here(line: str) -> str:
        for old, new in local.items():
            line = line.replace(old, new)
        return line

    serve_and_drain(here(serve.line), tmp_path)
    out = run(here(render.line), tmp_path)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load((tmp_path / "envoy.yaml").read_text())["static_resources"]
