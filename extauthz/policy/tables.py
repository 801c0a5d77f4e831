"""Per-host lookup tables: what makes a check a few lookups, never a scan of the rules.

Per host (lowercase, no port):
* exact paths:        dict  path -> method -> rules
* segment prefixes:   dict  prefix -> method -> rules; `/a/b/c` looks up `/`, `/a`, `/a/b`,
                      `/a/b/c`
* templates:          a segment trie (`{name}` = a wildcard child matching one non-empty
                      segment), walked once along the path
* RE2 regexes:        bucketed by their literal leading segments (`^/v1/orders/[0-9]+$` lives
                      under `/v1/orders/`); only buckets on the request path are tried
So the cost grows with the depth of the path and the rules *on that route*, never with the
number of rules in the policy (bench/policy_scale.py measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extauthz.policy.rules import CompiledRule

ANY_METHOD = "*"
_REGEX_META = frozenset("\\.^$*+?()[]{}|")
_REGEX_QUANTIFIERS = frozenset("?*+{")


def regex_bucket(pattern: str) -> str:
    """The literal leading segments every match of `pattern` starts with ("" if unknown).

    `^/v1/orders/[0-9]+$` -> `/v1/orders/`. Conservative: any alternation, escape or
    quantifier on the last literal character shortens the prefix.
    """
    if "|" in pattern:
        return ""
    body = pattern[1:] if pattern.startswith("^") else pattern
    end = 0
    while end < len(body) and body[end] not in _REGEX_META:
        end += 1
    run = body[:end]
    if end < len(body) and body[end] in _REGEX_QUANTIFIERS:
        run = run[:-1]
    if not run.startswith("/"):
        return ""
    return run[: run.rfind("/") + 1]



@dataclass(slots=True)
class _Node:
    lit: dict[str, _Node] = field(default_factory=dict)
    var: _Node | None = None
    exact: dict[str, list[CompiledRule]] = field(default_factory=dict)
    prefix: dict[str, list[CompiledRule]] = field(default_factory=dict)


def _by_method(index: dict[str, list[CompiledRule]], method: str) -> list[CompiledRule]:
    a = index.get(method)
    b = index.get(ANY_METHOD)
    if a is None:
        return b or []
    return a + b if b else a


@dataclass(slots=True)
class HostTable:
    """One host's rules, indexed by path kind (see the module docstring)."""

    exact: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)
    prefix: dict[str, dict[str, list[CompiledRule]]] = field(default_factory=dict)
    trie: _Node | None = None
    regex: dict[str, list[CompiledRule]] = field(default_factory=dict)
    rules: list[CompiledRule] = field(default_factory=list)
    header_names: tuple[str, ...] = ()
    claim_names: tuple[str, ...] = ()
    uses_time: bool = False
    filtered: bool = False

    def candidates(self, method: str, path: str) -> list[CompiledRule]:
        """Rules whose method and path match: exact, templates, regexes, then prefixes
        (longest first). Headers and conditions are not looked at here."""
        table = self
        found: list[CompiledRule] = []
        by_method = table.exact.get(path)
        if by_method is not None:
            found += _by_method(by_method, method)
        prefixed: list[tuple[int, list[CompiledRule]]] = []
        templated: list[tuple[int, list[CompiledRule]]] = []
        if table.trie is not None:
            self._walk(table.trie, path, method, found, templated)
        if table.regex:
            self._regexes(table.regex, path, method, found)
        if table.prefix:
            rules = table.prefix.get("/")
            if rules is not None:
                prefixed.append((0, _by_method(rules, method)))
            depth, start = 0, 1
            while start < len(path):
                slash = path.find("/", start)
                end = len(path) if slash < 0 else slash
                depth += 1
                rules = table.prefix.get(path[:end])
                if rules is not None:
                    prefixed.append((depth, _by_method(rules, method)))
                if slash < 0:
                    break
                start = slash + 1
        if templated:
            prefixed += templated
        if prefixed:
            prefixed.sort(key=lambda item: -item[0])  # stable: literal before template
            for _, rules_at in prefixed:
                found += rules_at
        return found

    @staticmethod
    def _walk(root: _Node, path: str, method: str, found: list[CompiledRule],
              prefixed: list[tuple[int, list[CompiledRule]]]) -> None:
        segs = path.split("/")[1:]
        stack = [(root, 0)]
        while stack:
            node, i = stack.pop()
            if node.prefix and i > 0:
                prefixed.append((i, _by_method(node.prefix, method)))
            if i == len(segs):
                if node.exact:
                    found += _by_method(node.exact, method)
                continue
            seg = segs[i]
            if node.var is not None and seg:
                stack.append((node.var, i + 1))
            child = node.lit.get(seg)
            if child is not None:
                stack.append((child, i + 1))

    @staticmethod
    def _regexes(buckets: dict[str, list[CompiledRule]], path: str, method: str,
                 found: list[CompiledRule]) -> None:
        keys = [""]
        slash = path.find("/")
        while slash >= 0:
            keys.append(path[: slash + 1])
            slash = path.find("/", slash + 1)
        for key in keys:
            for rule in buckets.get(key, ()):
                if rule.method_matches(method) and rule.regex.fullmatch(path) is not None:
                    found.append(rule)


def index(table: HostTable, rule: CompiledRule) -> None:
    table.rules.append(rule)
    decl = rule.decl
    methods = decl.methods or {ANY_METHOD}
    kind = decl.path.kind
    if kind == "regex":
        table.regex.setdefault(regex_bucket(decl.path.value), []).append(rule)
        return
    if kind in ("exact", "prefix"):
        by_method = (table.exact if kind == "exact" else table.prefix).setdefault(
            decl.path.value, {})
    else:
        node = table.trie = table.trie or _Node()
        for seg in decl.path.segments:
            if seg:
                node = node.lit.setdefault(seg, _Node())
            else:
                node.var = node.var or _Node()
                node = node.var
        by_method = node.exact if kind == "template" else node.prefix
    for method in methods:
        by_method.setdefault(method, []).append(rule)


def finish(table: HostTable) -> None:
    names: set[str] = set()
    claims: set[str] = set()
    for rule in table.rules:
        names.update(h.decl.name for h in rule.headers)
        cond = rule.decl.condition
        if cond is not None:
            names.update(cond.headers)
            claims.update(cond.claims)
            table.uses_time = table.uses_time or cond.uses_time
        for who in (rule.allow, rule.deny):
            for m in who.jwt:
                claims.update(name for name, _ in m.claims)
    table.header_names = tuple(sorted(names))
    table.claim_names = tuple(sorted(claims))
    table.filtered = bool(table.header_names or table.claim_names or table.uses_time)
