"""Real Redis Cluster and Sentinel deployments on loopback, for the scale-out tests.

* `RedisClusterNodes`: three masters (`redis-server --cluster-enabled yes`) joined by
  `redis-cli --cluster create --cluster-yes`; helpers to migrate one slot by hand (the
  commands `redis-cli --cluster reshard` runs, one slot, so a test controls the moment).
* `SentinelSetup`: one master, one replica, three Sentinels (`redis-server --sentinel`),
  quorum 2, `down-after-milliseconds 1000`, so a killed master fails over in about three
  seconds.

Every process is a `RedisServer`: started on a free port, stopped by its PID.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable

from tests.redis_server import RedisServer, free_port, ping

CLI_HINT = (
    "redis-cli is required for the Redis Cluster tests (redis-cli --cluster create) and "
    "was not found on PATH. Install it: Debian/Ubuntu: sudo apt-get install redis-tools "
    "(scripts/bootstrap.sh --with-system-packages does)."
)
SENTINEL_QUORUM = 2
# 1 s, not less: a master starved of CPU for half a second on a busy 2-core machine must not
# look dead (a spurious failover is a real split brain, not the test's subject).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def find_redis_cli() -> str | None:
    return shutil.which("redis-cli")


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout} s")


def cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """One redis-cli command against 127.0.0.1:port; its stdout (raises on failure)."""
    binary = find_redis_cli()
    if binary is None:
        raise FileNotFoundError(CLI_HINT)
    out = subprocess.run(
        [binary, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True, text=True, timeout=timeout, check=True,
    )
    return out.stdout.strip()


def _info_field(text: str, name: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid (<= 65535)."""
    for _ in range(200):
        port = free_port()
        if port <= 55535:
            with contextlib.suppress(OSError), socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
                return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterNodes:
    """Three masters, no replicas, all 16384 slots covered."""

    def __init__(self, masters: int = 3) -> None:
        if find_redis_cli() is None:
            raise FileNotFoundError(CLI_HINT)
        self.nodes = [
            RedisServer(port=cluster_port(), extra=("--cluster-enabled", "yes",
                               "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000"))
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterNodes:
        try:
            for node in self.nodes:
                node.start()
            cli(self.nodes[0].port, "--cluster", "create",
                *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes", timeout=60)
            wait_for("cluster_state:ok on every node", lambda: all(
                _info_field(cli(n.port, "cluster", "info"), "cluster_state") == "ok"
                for n in self.nodes))
        except BaseException:
            self.close()
            raise
        return self

    def node_id(self, port: int) -> str:
        return cli(port, "cluster", "myid")

    def owner(self, slot: int) -> RedisServer:
        """The master serving `slot`, as the first node's slot map says."""
        for line in cli(self.nodes[0].port, "cluster", "nodes").splitlines():
            fields = line.split()
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"slot {slot} is not served")

    def migrate_slot(self, slot: int, target: RedisServer, pause: float = 0.0) -> int:
        """Move `slot` and its keys to `target` while clients keep using it; returns how
        many keys moved. `pause` seconds in the MIGRATING/IMPORTING state before the keys
        move, so traffic meets ASK redirections."""
        source = self.owner(slot)
        src_id, dst_id = self.node_id(source.port), self.node_id(target.port)
        cli(target.port, "cluster", "setslot", str(slot), "importing", src_id)
        cli(source.port, "cluster", "setslot", str(slot), "migrating", dst_id)
        time.sleep(pause)
        moved = 0
        while True:
            keys = cli(source.port, "cluster", "getkeysinslot", str(slot), "100").split()
            if not keys:
                break
            cli(source.port, "migrate", "127.0.0.1", str(target.port), "", "0", "5000",
                "keys", *keys)
            moved += len(keys)
        for node in self.nodes:
            cli(node.port, "cluster", "setslot", str(slot), "node", dst_id)
        return moved

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()

    def __enter__(self) -> RedisClusterNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


SENTINEL_CONF = """\
sentinel monitor {name} 127.0.0.1 {master} {quorum}
sentinel down-after-milliseconds {name} {down_after}
sentinel failover-timeout {name} {failover_timeout}
sentinel parallel-syncs {name} 1
"""


class SentinelSetup:
    """Master + replica + three Sentinels watching `name`."""

    def __init__(self, name: str = "limits", sentinels: int = 3) -> None:
        self.name = name
        # No 5 s wait for more replicas before a full sync (the default diskless delay).
        # min-replicas-*: what docs/rate-limits.md recommends, so that a master cut off from
        # its replica refuses writes instead of granting budget that a failover forgets.
        self.master = RedisServer(extra=("--repl-diskless-sync-delay", "0",
                                         "--min-replicas-to-write", "1",
                                         "--min-replicas-max-lag", "3"))
        self.replica = RedisServer(extra=("--replicaof", "127.0.0.1", str(self.master.port)))
        conf = SENTINEL_CONF.format(
            name=name, master=self.master.port, quorum=SENTINEL_QUORUM,
            down_after=DOWN_AFTER_MS, failover_timeout=FAILOVER_TIMEOUT_MS,
        )
        # Each Sentinel starts knowing the replica and the others (by their fixed ids), as a
        # rewritten sentinel.conf would after discovery: no waiting for hello messages.
        ports = [free_port() for _ in range(sentinels)]
        ids = [secrets.token_hex(20) for _ in range(sentinels)]
        self.sentinels = []
        for i, port in enumerate(ports):
            known = "".join(
                f"sentinel known-sentinel {name} 127.0.0.1 {ports[j]} {ids[j]}\n"
                for j in range(sentinels) if j != i
            )
            self.sentinels.append(RedisServer(
                port=port,
                extra=("--sentinel",),
                config=conf + f"sentinel myid {ids[i]}\n"
                f"sentinel known-replica {name} 127.0.0.1 {self.replica.port}\n" + known,
            ))

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.name}"

    def master_port(self) -> int:
        """The master's port as the first answering Sentinel reports it."""
        for s in self.sentinels:
            if s.proc is None or not ping(s.port):
                continue
            with contextlib.suppress(subprocess.SubprocessError):
                answer = cli(s.port, "sentinel", "get-master-addr-by-name", self.name).split()
                if len(answer) == 2:
                    return int(answer[1])
        raise LookupError("no Sentinel answers")

    def start(self) -> SentinelSetup:
        try:
            self.master.start()
            self.replica.start()
            wait_for("replica in sync", lambda: _info_field(
                cli(self.replica.port, "info", "replication"), "master_link_status") == "up")
            for s in self.sentinels:
                s.start()
            # Every Sentinel knows the replica and the other Sentinels: a failover can
            # only be agreed on once they do.
            wait_for("sentinels see the replica and each other", lambda: all(
                _info_field(cli(s.port, "info", "sentinel"), "master0").endswith(
                    f"slaves=1,sentinels={len(self.sentinels)}")
                for s in self.sentinels))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for server in (*self.sentinels, self.replica, self.master):
            with contextlib.suppress(Exception):
                server.close()

    def __enter__(self) -> SentinelSetup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
