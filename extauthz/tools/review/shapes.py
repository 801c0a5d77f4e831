"""Route shapes: a logged path as a policy template (`/v1/orders/42` -> `/v1/orders/{id}`).

Numeric and long id-like segments are recognised one path at a time (`is_variable`). Ids with
no digits (usernames, slugs) cannot be told from words by looking at one path; `ShapeLearner`
sees many: a position where more than `SLUG_THRESHOLD` distinct literal values follow the same
preceding shape is a variable too (`/v1/users/alice`, `/v1/users/bob`, ... -> `/v1/users/{id}`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from extauthz.policy.compiled import CompiledRule
from extauthz.policy.document import PathMatch

METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE")
_VERSIONED = re.compile(r"^v\d+([a-z]+\d*)?$")
_BAD_PATH = re.compile(r"[{}%\\?#]|//|/\.\.?(/|$)")
_DIGIT = re.compile(r"[0-9]")
MAX_SEGMENTS = 16


def is_variable(segment: str) -> bool:
    """An id-like path segment (`42`, `sku-1`, a UUID, a long token); `v1` is not."""
    if len(segment) >= 24:
        return True
    return _DIGIT.search(segment) is not None and _VERSIONED.match(segment) is None


def shape_of(path: str, base: PathMatch | None = None) -> str | None:
    """`path` with id-like segments replaced by `{id}`, `{id2}`...; the segments covered by
    `base` (a prefix or template-prefix rule path) are the rule's own. None when the path
    cannot be written as a policy template (empty segment, `%`, braces, too deep)."""
    if path == "/":
        return "/"
    segs = path.split("/")[1:]
    if len(segs) > MAX_SEGMENTS or _BAD_PATH.search(path) is not None:
        return None
    own: list[str] = []
    if base is not None and base.value != "/":
        own = base.value.split("/")[1:]
    taken = {s[1:-1] for s in own if s.startswith("{")}
    out: list[str] = []
    n = 0
    for i, seg in enumerate(segs):
        if i < len(own):
            out.append(own[i])
            continue
        if not seg:
            return None
        if is_variable(seg):
            n += 1
            name = "id" if n == 1 else f"id{n}"
            while name in taken:
                name += "_"
            taken.add(name)
            out.append("{" + name + "}")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def generic_shape(path: object) -> str:
    if not isinstance(path, str) or not path:
        return "-"
    return shape_of(path) or "(unshaped)"


def describe_route(rule: CompiledRule) -> str:
    d = rule.decl
    methods = ",".join(ordered(d.methods)) if d.methods else "any method"
    path = {"prefix": f"{d.path.value.rstrip('/')}/**", "template_prefix":
            f"{d.path.value}/**", "regex": f"~{d.path.value}"}.get(d.path.kind, d.path.value)
    return f"{methods} {'|'.join(d.hosts)}{path}"


def ordered(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 99, m))
