"""The checks every HTTP request passes before the decision cache: one place, run once.

A request is turned into its `Route` (method, normalized host, normalized path) or refused
with a 403 before any cached answer or rule is consulted:

* an unknown or missing method, a malformed host, an ambiguous path (see policy/paths.py);
* a method override naming another method than the request's, by query parameter
  (`?_method=DELETE`: Symfony, Laravel, Express's `method-override`) or by header
  (`x-http-method-override` and friends). Overrides are never honoured, and because they are
  refused here, before the cache, override headers are never part of a cache key.

Everything after the guards (cache, policy, limits, observers) reads the `Route` and never
normalizes again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from extauthz import headers as names
from extauthz.model import Reason, Request
from extauthz.policy.decls import METHODS

MAX_HOST_LENGTH = 255


class Route(NamedTuple):
    """What the policy matches on, in canonical form. (A tuple: made on every check.)"""

    method: str
    host: str
    path: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the guards refuse a request (always a 403)."""

    reason: Reason
    detail: str


def normalize_host(raw: str) -> str | None:
    """Lowercase and drop the port: `Orders.Mesh:8443` -> `orders.mesh`; None if malformed."""
    if not raw or len(raw) > MAX_HOST_LENGTH:
        return None
    host = raw.lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else None
    colon = host.rfind(":")
    if colon >= 0:
        if not host[colon + 1 :].isdigit():
            return None
        host = host[:colon]
    if not host or any(c <= " " or c in "/\\@" for c in host):
        return None
    return host


def guard(request: Request, host: str | None, path: str | None) -> Route | Refusal:
    """The request's Route, or why it is refused. `host` and `path` are the request's,
    normalized once by the caller (`normalize_host`, `normalize_path`; the host memoized)."""
    method = request.method
    if method not in METHODS:
        return Refusal(Reason.MALFORMED_REQUEST, "unsupported or missing HTTP method")
    if host is None or path is None:
        what = "host" if host is None else "path"
        return Refusal(
            Reason.AMBIGUOUS_PATH if path is None else Reason.MALFORMED_REQUEST,
            f"the request {what} is malformed or ambiguous",
        )
    raw_path = request.path
    override = query_method_override(method, raw_path) if "?" in raw_path else ""
    if not override and request.headers:
        override = header_method_override(method, request.headers)
    if override:
        return Refusal(Reason.METHOD_OVERRIDE, override)
    return Route(method, host, path)


def header_method_override(method: str, headers: Mapping[str, str]) -> str:
    """A reason to deny when an override header names another method ("" when none)."""
    for name in names.METHOD_OVERRIDE:
        value = headers.get(name)
        if value is not None and value.strip().upper() != method:
            return (f"{name}: {value[:32]!r} differs from the request method {method}; "
                    "method overrides are not honoured")
    return ""


def query_method_override(method: str, raw_path: str) -> str:
    """A reason to deny when a `_method` query parameter names another method ("" if none).

    The query is not part of what rules match, nor of the decision cache key, so this reads
    the raw `:path`."""
    head = raw_path.split("#", 1)[0]
    q = head.find("?")
    if q < 0:
        return ""
    for pair in head[q + 1 :].split("&"):
        name, _, value = pair.partition("=")
        if _unquote(name).strip().lower() in names.METHOD_OVERRIDE_PARAMS:
            wanted = _unquote(value).strip().upper()
            if wanted != method:
                return (f"query parameter {name[:16]!r}={wanted[:32]!r} differs from the request "
                        f"method {method}; method overrides are not honoured")
    return ""


def _unquote(text: str) -> str:
    """Form-style decoding (`+` and `%XX`) of one query component; bad escapes stay."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if (text[i] == "%" and i + 2 < len(text)
                and all(c in "0123456789abcdefABCDEF" for c in text[i + 1 : i + 3])):
            out.append(chr(int(text[i + 1 : i + 3], 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
