"""`--redis-url`: which Redis deployment the shared limiter talks to.

Three forms (docs/rate-limits.md, "Scale-out"):

* `redis://[user:password@]host:port/db`, `rediss://...` (TLS), `unix:///path?db=N`: one
  Redis, parsed by redis-py's own `from_url`;
* `redis+cluster://[user:password@]host:port[,host:port...]`: Redis Cluster; the listed
  nodes are only where discovery starts (any one reachable node is enough);
* `redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]`: the master
  of `service_name` as the listed Sentinels report it, followed through failovers. The
  credentials are the data nodes'; the Sentinels are asked without credentials.

Parsed and validated at start-up (a bad URL is a configuration error, exit 2); no Redis
import here, so settings validation can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import unquote, urlsplit


class RedisKind(StrEnum):
    SINGLE = "single"
    CLUSTER = "cluster"
    SENTINEL = "sentinel"


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: RedisKind
    url: str  # as given (SINGLE hands it to redis-py)
    nodes: tuple[tuple[str, int], ...] = ()  # CLUSTER: start-up nodes; SENTINEL: sentinels
    service: str = ""  # SENTINEL: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never print the password
        return f"RedisTarget({self.kind.value}, {redacted(self.url)})"


SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"


def redacted(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else f"{user}@{hosts}"
    return f"{scheme}://{netloc}{slash}{tail}"


def _node(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [::1]:7000
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redis_url: {text!r} is not host:port in {redacted(url)}")
    return host, int(port)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse and validate; raises ValueError with a one-line message naming the problem."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(f"redis_url: expected SCHEME://..., got {redacted(url)!r}")
    if scheme in SINGLE_SCHEMES:
        parts = urlsplit(url)
        if scheme != "unix" and not parts.hostname:
            raise ValueError(f"redis_url: no host in {redacted(url)}")
        return RedisTarget(RedisKind.SINGLE, url)
    if scheme not in (CLUSTER_SCHEME, SENTINEL_SCHEME):
        raise ValueError(
            f"redis_url: unknown scheme {scheme!r} (redis, rediss, unix, "
            f"{CLUSTER_SCHEME} or {SENTINEL_SCHEME})"
        )
    if "?" in rest or "#" in rest:
        raise ValueError(f"redis_url: {scheme}:// takes no query or fragment: {redacted(url)}")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(n, url) for n in netloc.split(",") if n)
    if not nodes:
        raise ValueError(f"redis_url: no host:port in {redacted(url)}")
    segments = [s for s in path.split("/") if s]
    if scheme == CLUSTER_SCHEME:
        if segments:
            raise ValueError(
                f"redis_url: Redis Cluster has only database 0; drop {'/' + path!r} "
                f"from {redacted(url)}"
            )
        return RedisTarget(
            RedisKind.CLUSTER, url, nodes, username=username, password=password
        )
    if not segments or len(segments) > 2:
        raise ValueError(
            f"redis_url: expected {SENTINEL_SCHEME}://host:port[,host:port]/service_name[/db],"
            f" got {redacted(url)}"
        )
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"redis_url: database must be a number in {redacted(url)}")
        db = int(segments[1])
    return RedisTarget(
        RedisKind.SENTINEL,
        url,
        nodes,
        service=unquote(segments[0]),
        db=db,
        username=username,
        password=password,
    )
