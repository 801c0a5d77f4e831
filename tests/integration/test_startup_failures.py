"""Start-up failures of the real `extauthz serve` process: one line, the setting, the cause.

Exit 2 when the settings are wrong, 1 when the host refused valid settings (issue 19).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .server_process import free_port, running_server, stop, wait_serving

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policy"
    shutil.copytree(REPO / "policy", d)
    return d


def extauthz(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", *argv], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The whole of stderr, asserted to be a single line without a traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_readme_step_one_with_a_missing_socket_folder_is_one_line_exit_1(
        policy_dir: Path, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "extauthz" / "authz.sock"
    out = extauthz("serve", "--policy", str(policy_dir), "--listen", f"unix:{sock}")
    line = one_line(out)
    assert out.returncode == 1
    assert line.startswith(f"extauthz serve: listen: cannot bind unix:{sock}: ")
    assert f"folder {sock.parent} does not exist" in line


def test_an_address_not_on_this_host_is_one_line_exit_1(policy_dir: Path) -> None:
    addr = f"192.0.2.1:{free_port()}"  # TEST-NET-1 (RFC 5737): never a local address
    out = extauthz("serve", "--policy", str(policy_dir), "--listen", addr)
    assert out.returncode == 1
    assert one_line(out) == (f"extauthz serve: listen: cannot bind {addr}: "
                             "address not available on this host")


def test_a_port_held_by_another_program_is_one_line_exit_1(policy_dir: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        addr = f"127.0.0.1:{other.getsockname()[1]}"
        out = extauthz("serve", "--policy", str(policy_dir), "--listen", addr)
    assert out.returncode == 1
    assert "address already in use" in one_line(out)


def test_a_live_unix_socket_is_not_stolen_but_a_stale_one_is_replaced(
        policy_dir: Path, tmp_path: Path) -> None:
    sock = tmp_path / "authz.sock"
    with running_server(policy_dir, tmp_path, extra=["--listen", f"unix:{sock}"]):
        out = extauthz("serve", "--policy", str(policy_dir), "--listen", f"unix:{sock}")
        assert out.returncode == 1
        assert "another server is listening on it" in one_line(out)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # the file stays, nobody listens
    with running_server(policy_dir, tmp_path, extra=["--listen", f"unix:{sock}"]):
        pass


def test_a_regular_file_where_the_socket_goes_is_refused(policy_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "authz.sock"
    path.write_text("not a socket")
    out = extauthz("serve", "--policy", str(policy_dir), "--listen", f"unix:{path}")
    assert out.returncode == 1 and "exists and is not a socket" in one_line(out)
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize(("content", "expected"), [
    (bytes(range(256)), "not UTF-8 text"),
    (b"listen: [\n", "line 2: invalid YAML"),
    (b"- a list\n", "must be a mapping"),
    (b"cache_sise: 5\n", "unknown setting 'cache_sise'"),
])
def test_a_bad_config_file_is_one_line_exit_2(policy_dir: Path, tmp_path: Path, content: bytes,
                                               expected: str) -> None:
    cfg = tmp_path / "extauthz.yaml"
    cfg.write_bytes(content)
    out = extauthz("serve", "--policy", str(policy_dir), "--config", str(cfg))
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith(f"extauthz serve: config file {cfg}") and expected in line


def test_a_config_path_that_is_a_folder_is_one_line_exit_2(policy_dir: Path, tmp_path: Path) -> None:
    out = extauthz("serve", "--policy", str(policy_dir), "--config", str(tmp_path))
    assert out.returncode == 2 and "Is a directory" in one_line(out)


@pytest.mark.parametrize(("flags", "expected"), [
    (["--workers", "2", "--listen", "unix:/tmp/x.sock"], "unix socket cannot be shared"),
    (["--tls-cert", "/nonexistent.pem"], "required with TLS"),
    (["--decision-log-sample-allowed", "2"], "decision_log_sample_allowed: must be between"),
    (["--metrics-listen", "unix:/tmp/m.sock"], "metrics_listen: expected HOST:PORT"),
    (["--decision-log", "/nonexistent/dir/decisions.log"], "decision_log: cannot open"),
    (["--revocation-file", "/nonexistent/revoked.yaml"], "revocation_file:"),
])
def test_print_config_refuses_exactly_what_serve_refuses(policy_dir: Path, flags: list[str],
                                                         expected: str) -> None:
    base = ["serve", "--policy", str(policy_dir), *flags]
    printed = extauthz(*base, "--print-config")
    served = extauthz(*base)
    assert printed.returncode == served.returncode == 2
    assert one_line(printed) == one_line(served)
    assert expected in one_line(printed)


def test_print_config_refuses_a_policy_that_does_not_load(tmp_path: Path) -> None:
    out = extauthz("serve", "--policy", str(tmp_path / "missing"), "--print-config")
    assert out.returncode == 2 and "policy: cannot load" in one_line(out)
    assert out.stdout == ""


def _second_instance_is_refused(policy_dir: Path, first_argv: list[str], second_argv: list[str]) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                              "--listen", target, "--decision-log", "none", *first_argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(target, first)
        out = extauthz("serve", "--policy", str(policy_dir), "--listen", target, *second_argv)
        assert out.returncode == 1
        line = one_line(out)
        assert line.startswith(f"extauthz serve: listen: cannot bind {target}: ")
        assert "already in use" in line or "another extauthz --workers instance" in line
        wait_serving(target, first, timeout=5)  # the first one is untouched
    finally:
        assert stop(first) == 0


@pytest.mark.parametrize(("first", "second"), [
    ([], []),
    ([], ["--workers", "2"]),
    (["--workers", "2"], []),
    (["--workers", "2"], ["--workers", "2"]),
])
def test_a_second_serve_on_a_port_in_use_fails_clearly(policy_dir: Path, first: list[str],
                                                       second: list[str]) -> None:
    _second_instance_is_refused(policy_dir, first, second)


def test_a_worker_environment_set_by_hand_does_not_join_another_port(policy_dir: Path) -> None:
    """SO_REUSEPORT only for a supervisor's own workers: claiming to be one is not enough."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    first = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                              "--listen", target, "--workers", "2", "--decision-log", "none"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(target, first)
        out = extauthz("serve", "--policy", str(policy_dir), "--listen", target,
                       env={"EXTAUTHZ_SUPERVISOR_PID": str(first.pid), "EXTAUTHZ_WORKER_INDEX": "0"})
        assert out.returncode == 1, out.stderr
        assert "Traceback" not in out.stderr
    finally:
        assert stop(first) == 0


def test_demo_without_the_envoy_extra_names_the_extra(tmp_path: Path) -> None:
    """Simulates an install without `extauthz[envoy]`: its modules cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('envoy_data_plane', 'betterproto2'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = extauthz("demo", env=env)
    assert out.returncode == 2
    line = one_line(out)
    assert "needs the 'envoy' extra" in line and "pip install 'extauthz[envoy]'" in line


def _children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def test_workers_sigterm_in_any_phase_of_start_up_is_a_clean_exit(policy_dir: Path) -> None:
    """A drain exits 0 whether each worker was importing, binding or serving (it returns
    -15 before its handler exists); repeated over many moments of start-up, counted from
    the first worker's start (the supervisor's handlers are installed by then)."""
    delays = [0.0, 0.01, 0.05, 0.15, 0.4, 0.9, 2.0]
    for delay in delays:
        proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy",
                                 str(policy_dir), "--listen", f"127.0.0.1:{free_port()}",
                                 "--workers", "2", "--decision-log", "none"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (delay, err)
        assert "Traceback" not in err, (delay, err)


def test_an_http_listen_port_in_use_is_one_line_exit_1(policy_dir: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        addr = f"127.0.0.1:{other.getsockname()[1]}"
        out = extauthz("serve", "--policy", str(policy_dir), "--http-listen", addr)
    assert out.returncode == 1
    line = one_line(out)
    assert line.startswith(f"extauthz serve: http_listen: cannot bind {addr}: address already in use")


def test_a_metrics_port_in_use_is_a_runtime_failure_exit_1(policy_dir: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        addr = f"127.0.0.1:{other.getsockname()[1]}"
        out = extauthz("serve", "--policy", str(policy_dir), "--listen",
                       f"127.0.0.1:{free_port()}", "--metrics-listen", addr)
    assert out.returncode == 1
    assert one_line(out).startswith(f"extauthz serve: metrics_listen: cannot bind {addr}: "
                                    "address already in use")


def test_workers_sighup_in_any_phase_of_start_up_never_kills_a_worker(policy_dir: Path) -> None:
    """A reload forwarded while a worker is still starting is ignored, not fatal."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                             "--listen", f"127.0.0.1:{port}", "--workers", "2",
                             "--decision-log", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        for _ in range(40):  # every 50 ms through start-up and into serving
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        wait_serving(f"127.0.0.1:{port}", proc)
        assert proc.poll() is None
        assert len(_children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert '"event": "worker_exited"' not in err and "Traceback" not in err


def test_a_worker_killed_from_outside_stops_the_unit_with_exit_1(policy_dir: Path) -> None:
    """Not a drain: the supervisor stops the other worker and exits 1 (killed by a signal), so
    the orchestrator restarts the whole unit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--policy", str(policy_dir),
                             "--listen", f"127.0.0.1:{port}", "--workers", "2",
                             "--decision-log", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        deadline = time.monotonic() + 30
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        victim, other = _children(proc.pid)
        os.kill(int(victim), signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 1, err
    assert '"event": "worker_exited"' in err and '"status": -9' in err
    assert not Path(f"/proc/{other}").exists() or "Z" in Path(f"/proc/{other}/stat").read_text().split()[2]
