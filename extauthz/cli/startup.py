"""What `extauthz serve` checks before it starts, shared with `--print-config`.

Two kinds of start-up failure, two exit codes, one line each:

- exit 2, `SettingsError`: the settings themselves are wrong (a value serve refuses, a
  policy that does not load, a config file that is not YAML). Fix the flags or files.
- exit 1, `StartupError`: the settings are valid but this host refused them at run time (a
  port already in use, a socket folder that does not exist, an address not on this host).

`check_settings` is the one validation both `serve` and `serve --print-config` run, so the
printed configuration is exactly what serve would accept. `check_listeners` tries each listen
address the way the server will bind it, so the operator reads `listen: 127.0.0.1:9191:
address already in use` instead of gRPC's generic "Failed to bind".
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from extauthz.settings import Settings, SettingsError, parse_listen_address


class StartupError(RuntimeError):
    """Valid settings the host refused at start-up (exit 1); the message is one line."""


def check_settings(settings: Settings) -> None:
    """Everything `serve` refuses before it binds anything, as SettingsError (exit 2)."""
    from extauthz.app import identity_config_from
    from extauthz.policy.document import PolicyError
    from extauthz.sources.policy_store import PolicyLoadError, load_policy
    from extauthz.sources.revocation import RevocationError, load_revocations
    from extauthz.transport.tls import TlsConfig
    from extauthz.transport.workers import check_workers

    check_workers(settings)
    if settings.policy is None:
        raise SettingsError("policy: a policy directory is required (--policy DIR)")
    try:
        load_policy(settings.policy)
    except (PolicyLoadError, PolicyError) as exc:
        raise SettingsError(f"policy: cannot load: {exc}") from None
    if settings.revocation_file is not None:
        try:
            load_revocations(settings.revocation_file)
        except RevocationError as exc:
            raise SettingsError(f"revocation_file: {exc}") from None
    identity_config_from(settings)
    TlsConfig.from_settings(settings)
    if not 0.0 <= settings.decision_log_sample_allowed <= 1.0:
        raise SettingsError(
            "decision_log_sample_allowed: must be between 0 and 1, not "
            f"{settings.decision_log_sample_allowed}"
        )
    if settings.metrics_listen:
        host, _ = parse_listen_address(settings.metrics_listen)
        if host == "unix":
            raise SettingsError("metrics_listen: expected HOST:PORT, not a unix socket")
    if settings.decision_log not in ("stdout", "none", ""):
        folder = Path(settings.decision_log).parent
        if not folder.is_dir():
            raise SettingsError(
                f"decision_log: cannot open {settings.decision_log}: folder {folder} "
                "does not exist"
            )


def check_listeners(settings: Settings) -> None:
    """Bind (and release) every listen address as the server will, raising StartupError
    with the operating system's reason. A `--workers` supervisor runs it before it starts
    any worker (its workers then share the port only with each other)."""
    for name, addresses in (("listen", settings.listen), ("http_listen", settings.http_listen)):
        for addr in addresses:
            host, where = parse_listen_address(addr)
            if host == "unix":
                _check_unix(name, addr, Path(str(where)))
            else:
                _check_tcp(name, addr, host, int(where))
    if settings.metrics_listen:  # one port per worker: base port + index
        host, port = parse_listen_address(settings.metrics_listen)
        for index in range(settings.workers if int(port) else 1):
            addr = f"{host}:{int(port) + index}"
            _check_tcp("metrics_listen", addr, host, int(port) + index)


def _check_unix(name: str, addr: str, path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise StartupError(
            f"{name}: cannot bind {addr}: folder {folder} does not exist (create it first, "
            "e.g. systemd RuntimeDirectory=, or a Kubernetes emptyDir volume)"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StartupError(f"{name}: cannot bind {addr}: folder {folder} is not writable")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{name}: cannot bind {addr}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket from a previous run: the server replaces it
    raise StartupError(
        f"{name}: cannot bind {addr}: another server is listening on it (stop it, or choose "
        "another path)"
    )


def _check_tcp(name: str, addr: str, host: str, port: int) -> None:
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"{name}: cannot bind {addr}: {exc.strerror}") from None
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR (a port in TIME_WAIT is free) but never
            # SO_REUSEPORT, so any listener already there, ours or not, is a conflict.
            # IPv6 stays dual-stack, as gRPC binds it.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
                probe.listen(1)
            except OSError as exc:
                raise StartupError(f"{name}: cannot bind {addr}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (another extauthz or another program listens there)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def instance_lock(settings: Settings) -> Iterator[None]:
    """Held by a `--workers` supervisor for its life: one abstract unix socket per TCP port.

    The workers bind with SO_REUSEPORT, which the kernel grants to any process of the same
    user; two supervisors started together could both pass `check_listeners` and then join
    each other's port. Binding `@extauthz-port-N` is exclusive per network namespace and is
    released by the kernel when the supervisor dies, however it dies."""
    held: list[socket.socket] = []
    try:
        for addr in (*settings.listen, *settings.http_listen):
            host, port = parse_listen_address(addr)
            if host == "unix":
                continue
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lock.bind(f"\0extauthz-port-{port}")
            except OSError:
                lock.close()
                raise StartupError(
                    f"listen: cannot bind {addr}: another extauthz --workers instance is "
                    f"starting or serving on port {port}"
                ) from None
            held.append(lock)
        yield
    finally:
        for lock in held:
            lock.close()
