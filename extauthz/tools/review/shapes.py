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


def shape_of(path: str, base: PathMatch | None = None,
             learned: frozenset[str] | set[str] = frozenset()) -> str | None:
    """`path` with id-like segments replaced by `{id}`, `{id2}`...; the segments covered by
    `base` (a prefix or template-prefix rule path) are the rule's own. A segment that follows
    a shape in `learned` (see `SlugLearner`) is a variable too. None when the path cannot be
    written as a policy template (empty segment, `%`, braces, too deep)."""
    if path == "/":
        return "/"
    segs = path.split("/")[1:]
    if len(segs) > MAX_SEGMENTS or _BAD_PATH.search(path) is not None:
        return None
    return _shape(segs, base, learned)


def _shape(segs: list[str], base: PathMatch | None, learned: frozenset[str] | set[str],
           seen: SlugLearner | None = None) -> str | None:
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
        prefix = "/" + "/".join(out)
        literal = not is_variable(seg) and not (seg.startswith("{") and seg.endswith("}"))
        if literal and seen is not None:
            seen.see(prefix, seg)
        if not literal or prefix in learned:
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


SLUG_THRESHOLD = 8  # distinct values after one shape before the position counts as an id
MAX_LEARNED_PREFIXES = 256


class SlugLearner:
    """Learns, from many paths of one rule, which positions hold ids without digits.

    The rule: after the same preceding shape (`/v1/users`), more than `SLUG_THRESHOLD`
    distinct literal segments (`alice`, `bob`, ... `ivan`) make that position a variable.
    A real sub-resource list (`/v1/orders/{id}/items`, `/history`, `/cancel`) stays well
    under it. Memory: at most `MAX_LEARNED_PREFIXES` shapes, each with at most
    `SLUG_THRESHOLD + 1` values."""

    def __init__(self, threshold: int = SLUG_THRESHOLD) -> None:
        self.threshold = threshold
        self.learned: set[str] = set()
        self._values: dict[str, set[str]] = {}
        self.overflow = 0

    def see(self, prefix: str, segment: str) -> None:
        if prefix in self.learned:
            return
        values = self._values.get(prefix)
        if values is None:
            if len(self._values) >= MAX_LEARNED_PREFIXES:
                self.overflow += 1
                return
            values = self._values[prefix] = set()
        values.add(segment)
        if len(values) > self.threshold:
            self.learned.add(prefix)
            del self._values[prefix]

    def shape(self, path: str, base: PathMatch | None = None) -> str | None:
        """Learn from `path`, then shape it with what is known so far."""
        if path == "/":
            return "/"
        segs = path.split("/")[1:]
        if len(segs) > MAX_SEGMENTS or _BAD_PATH.search(path) is not None:
            return None
        _shape(segs, base, self.learned, self)
        return _shape(segs, base, self.learned)

    def reshape(self, shape: str, base: PathMatch | None = None) -> str:
        """A shape recorded before a position was learned, with that position generalised
        (variables renumbered in order)."""
        if shape == "/":
            return shape
        segs = shape.split("/")[1:]
        plain = [("1" if s.startswith("{") and s.endswith("}") else s) for s in segs]
        own = len(base.value.split("/")[1:]) if base is not None and base.value != "/" else 0
        plain[:own] = segs[:own]
        return _shape(plain, base, self.learned) or shape

