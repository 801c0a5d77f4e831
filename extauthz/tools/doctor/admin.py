"""Fetch `/config_dump` from a running Envoy's admin interface, on loopback only.

The admin interface is unauthenticated and can change a running proxy (`/runtime_modify`,
`/quitquitquit`): the doctor only ever talks to one on this host (or through a port-forward
that makes it look local), so a typo can never send requests to somebody else's Envoy. No
proxy settings from the environment are used for the same reason, and the answer is bounded.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

MAX_DUMP_BYTES = 256 * 1024 * 1024  # an Istio sidecar's dump is a few MB; refuse runaway ones
TIMEOUT_S = 15.0


class AdminError(ValueError):
    """The admin URL is refused, unreachable or did not answer with a config dump."""


def dump_url(admin: str) -> str:
    """The `/config_dump?include_eds` URL for an admin base URL; AdminError unless it is a
    plain-HTTP loopback address."""
    parts = urlsplit(admin if "://" in admin else f"http://{admin}")
    if parts.scheme != "http":
        raise AdminError(f"--admin {admin!r}: only http:// (Envoy's admin interface has no TLS)")
    host = parts.hostname or ""
    if not _loopback(host):
        raise AdminError(
            f"--admin {admin!r}: refusing a non-loopback address ({host or 'no host'}); the "
            "admin interface is unauthenticated: use 127.0.0.1, [::1] or localhost, e.g. "
            "through `kubectl port-forward POD 15000`")
    try:
        port = parts.port
    except ValueError:
        raise AdminError(f"--admin {admin!r}: the port is not a number") from None
    if port is None:
        raise AdminError(f"--admin {admin!r}: give the admin port, e.g. http://127.0.0.1:9901")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"http://{netloc}/config_dump?include_eds"


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_config_dump(admin: str) -> tuple[str, Any]:
    """(the URL read, the parsed dump) of the Envoy whose admin listens at `admin`."""
    url = dump_url(admin)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT_S) as resp:  # http, loopback only
            body = resp.read(MAX_DUMP_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise AdminError(f"{url}: the admin interface answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminError(f"{url}: cannot reach the Envoy admin interface: {reason}") from None
    if len(body) > MAX_DUMP_BYTES:
        raise AdminError(f"{url}: the config dump is larger than {MAX_DUMP_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdminError(f"{url}: the answer is not JSON (is this an Envoy admin port?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list):
        raise AdminError(f"{url}: the answer is not a /config_dump (no 'configs' list)")
    return url, doc
