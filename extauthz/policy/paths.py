"""One canonical form of a request path, so that every rule sees the same string.

The rule (documented in docs/policy.md):
1. The path must be in origin form (start with `/`); anything else is ambiguous.
2. The query is cut off. A fragment (`#` anywhere) is ambiguous: clients never send one and
   Envoy strips it before ext_authz, so a raw path that still has one
   (`/api/items#/../../admin`) was made by hand, and servers disagree on whether the part
   after `#` is routed.
3. Control characters, whitespace and backslashes are ambiguous.
4. Percent-encoded unreserved characters (RFC 3986: letters, digits, `-._~`) are decoded;
   an encoded `/` (`%2F`), `\\` (`%5C`), NUL, a control character or a malformed escape is
   ambiguous; every other escape is kept, with uppercase hex.
5. Runs of `/` are merged; `.` and `..` segments are resolved; `..` above the root is
   ambiguous. A `.` or `..` segment carrying path parameters (`..;x`, `.;`) is ambiguous:
   servers that strip `;params` (Tomcat, Jetty) would resolve it where this rule could not.
6. Case and a trailing slash are kept: `/a/` is not `/a` for an exact rule.

Ambiguous paths are denied before any rule is consulted. Normalizing is idempotent.

Path parameters (`/v1/admin;x/users`) are kept, but servers that strip them (Tomcat, Jetty,
Spring) route that request to `/v1/admin/users`. So a path with `;` is allowed only if its
`without_params` form is allowed too (`CompiledPolicy.evaluate`); otherwise it is ambiguous.
"""

from __future__ import annotations

MAX_PATH_LENGTH = 8192

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")


def normalize_path(raw: str) -> str | None:
    """Return the canonical path, or None when the path is ambiguous and must be denied."""
    if not raw.startswith("/") or len(raw) > MAX_PATH_LENGTH:
        return None
    if "#" in raw:
        return None
    end = raw.find("?")
    path = raw if end < 0 else raw[:end]
    if "%" in path:
        decoded = _decode_unreserved(path)
        if decoded is None:
            return None
        path = decoded
    for ch in path:
        if ch <= " " or ch in "\x7f\\":
            return None
    if "//" not in path and "/." not in path:
        return path  # the common case: already canonical
    if ";" in path and any(seg.split(";", 1)[0] in (".", "..") for seg in path.split("/")
                           if ";" in seg):
        return None
    segments = path.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(seg)
    result = "/" + "/".join(out)
    if out and segments[-1] in ("", ".", ".."):
        result += "/"
    return result


def _decode_unreserved(path: str) -> str | None:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            return None
        code = int(part[:2], 16)
        ch = chr(code)
        if ch in _UNRESERVED:
            out.append(ch + part[2:])
        elif ch in "/\\" or code < 0x20 or code == 0x7F:
            return None
        else:
            out.append("%" + part[:2].upper() + part[2:])
    return "".join(out)


def without_params(path: str) -> str | None:
    """A normalized path as servers that drop `;params` from every segment see it (Tomcat,
    Jetty, Spring): `/v1/admin;x/users` -> `/v1/admin/users`. None if that is ambiguous."""
    if ";" not in path:
        return path
    return normalize_path("/".join(seg.split(";", 1)[0] for seg in path.split("/")))
