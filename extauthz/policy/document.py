"""The policy document: what service teams write, checked field by field.

This module validates parsed YAML data (plain dicts and lists) into typed, immutable
declarations. `load_yaml` parses text while recording the line of every key, so errors point
at `file:line`. Reading files lives in `policy_store.py`; turning declarations into fast lookup
structures lives in `matcher.py`. Unknown fields are errors, not warnings: a typo in a security
policy (`alow:`) must never silently widen or narrow access. So are duplicate keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import re2
import yaml

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern
from extauthz.policy.conditions import Condition, ConditionError, compile_condition
from extauthz.policy.connections import ConnectionPolicyError, ConnectionRuleDecl, parse_connections

API_VERSION = "extauthz/v1"
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_REGEX_LENGTH = 1024
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")  # fixed, not author-supplied
_VAR = re.compile(r"^\{([a-z_][a-z0-9_]{0,31})\}$")  # fixed: a `{name}` template segment
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")  # fixed: lowercase header token
_CLAIM = re.compile(r"^[A-Za-z0-9_.:/@$-]{1,256}$")  # fixed
_PERIOD = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_PERIOD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_PATH_CHARS_REJECTED = "%\\?#"


class PolicyError(ValueError):
    """A policy that cannot be loaded; names the file, the field and (when known) the line."""

    def __init__(self, source: str, field_path: str, message: str, line: int | None = None):
        self.source = source
        self.field_path = field_path
        self.message = message
        self.line = line
        if field_path:
            text = f"{source}: {field_path}: {message}"
            if line is not None:
                text += f" (line {line})"
        else:
            text = f"{source}:{line}: {message}" if line is not None else f"{source}: {message}"
        super().__init__(text)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line is not None else self.source


# --- YAML with line numbers ------------------------------------------------------------------


class LineMap(dict[str, Any]):
    """A YAML mapping that remembers where it and each of its keys were written."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.key_lines = {}


# libyaml's parser (CSafeLoader) is ~10x faster on a 10,000-rule policy; the constructors,
# and so the safety of what is built, are the same Python SafeConstructor either way.
_SafeBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeBase):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be strings", key_node.start_mark
            )
        key = str(key)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: bytes | str, source: str) -> object:
    """Parse one YAML document; mappings come back as `LineMap`. Raises PolicyError."""
    try:
        return yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", exc)
        raise PolicyError(source, "", f"invalid YAML: {problem}", line) from None
    except UnicodeDecodeError:
        raise PolicyError(source, "", "file is not UTF-8 text") from None


def line_of(data: object, key: str | None = None) -> int | None:
    if not isinstance(data, LineMap):
        return None
    if key is not None and key in data.key_lines:
        return data.key_lines[key]
    return data.line


# --- declarations ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimitDecl:
    rate: int
    period: float
    burst: int


@dataclass(frozen=True, slots=True)
class JwtMatch:
    """A caller known by a JWT of `issuer`: its `sub` and/or claims (all must match)."""

    issuer: str
    subject: str = ""  # "" = any subject of the issuer (then claims are required)
    claims: tuple[tuple[str, str | int | bool], ...] = ()


@dataclass(frozen=True, slots=True)
class PrincipalDecl:
    name: str
    spiffe: str  # an exact SPIFFE ID or a SpiffePattern; "" when the principal is a `jwt`
    owner: str
    source: str
    limit: LimitDecl | None = None
    jwt: JwtMatch | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PathMatch:
    """`exact` / `prefix` (segment prefix), `template` / `template_prefix` (with `{name}`
    segments) or `regex` (RE2, matched against the whole normalized path)."""

    kind: str
    value: str

    @property
    def segments(self) -> tuple[str, ...]:
        """Template segments; a `{name}` segment is returned as "" (matches one segment)."""
        if self.value == "/":
            return ()
        return tuple("" if _VAR.match(s) else s for s in self.value.split("/")[1:])


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lowercase
    kind: str  # "exact" | "present" | "absent" | "regex"
    value: str = ""


@dataclass(frozen=True, slots=True)
class RuleDecl:
    name: str
    hosts: tuple[str, ...]
    methods: frozenset[str]  # empty = any method
    path: PathMatch
    allow: tuple[str, ...]
    deny: tuple[str, ...]
    mode: str  # "enforce" | "dry-run"
    limit: LimitDecl | None
    source: str
    owner: str
    headers: tuple[HeaderMatch, ...] = ()
    when: str = ""
    condition: Condition | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    source: str
    owner: str
    service: str
    hosts: tuple[str, ...]
    principals: tuple[PrincipalDecl, ...]
    rules: tuple[RuleDecl, ...]
    # Which principals may open TCP connections (Envoy's network ext_authz filter).
    connections: tuple[ConnectionRuleDecl, ...] = ()


@dataclass(slots=True)
class _Reader:
    """Walks one mapping, remembering the field path (and lines) for error messages."""

    source: str
    path: str
    data: Mapping[str, object]
    line: int | None = None
    lines: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, source: str, path: str, data: Mapping[str, object]) -> _Reader:
        if isinstance(data, LineMap):
            return cls(source, path, data, data.line, data.key_lines)
        return cls(source, path, data)

    def error(self, key: str, message: str) -> PolicyError:
        where = f"{self.path}.{key}" if self.path else key
        return PolicyError(self.source, where, message, self.lines.get(key, self.line))

    def reject_unknown(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(str(key), f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def string(self, key: str, *, required: bool = True, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be a non-empty string")
        return value

    def string_list(
        self, key: str, *, required: bool = False, list_only: bool = False
    ) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return ()
        if isinstance(value, str):
            if list_only:  # who may call is never a bare word: `allow: checkout` is a typo
                raise self.error(key, f"must be a list: write [{value}]")
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of non-empty strings")
        return tuple(value)

    def child(self, key: str, value: object, index: int | None = None) -> _Reader:
        where = f"{self.path}.{key}" if self.path else key
        if index is not None:
            where = f"{where}[{index}]"
        if not isinstance(value, Mapping):
            line = self.lines.get(key, self.line)
            raise PolicyError(self.source, where, "must be a mapping", line)
        reader = _Reader.of(self.source, where, value)
        if reader.line is None:
            reader.line = self.lines.get(key, self.line)
        return reader


def parse_document(data: object, source: str) -> PolicyDocument:
    """Validate one parsed policy file. Raises PolicyError naming file, field and line."""
    if not isinstance(data, Mapping):
        raise PolicyError(source, "", "a policy file must be a YAML mapping")
    top = _Reader.of(source, "", data)
    top.reject_unknown(
        {"apiVersion", "owner", "service", "hosts", "principals", "rules", "connections"}
    )
    version = top.string("apiVersion")
    if version != API_VERSION:
        raise top.error("apiVersion", f"must be {API_VERSION!r}, got {version!r}")
    owner = top.string("owner")
    service = top.string("service")
    hosts = _hosts(top, top.string_list("hosts", required=True))
    if not hosts:
        raise top.error("hosts", "must name at least one host")

    principals = []
    raw_principals = data.get("principals", [])
    if not isinstance(raw_principals, list):
        raise top.error("principals", "must be a list")
    for i, raw in enumerate(raw_principals):
        principals.append(_principal(top.child("principals", raw, i), owner))

    rules = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise top.error("rules", "must be a list")
    for i, raw in enumerate(raw_rules):
        rules.append(_rule(top.child("rules", raw, i), hosts, owner))
    try:
        connections = parse_connections(data.get("connections"))
    except ConnectionPolicyError as exc:
        raise PolicyError(source, exc.field, exc.message, line_of(data, "connections")) from None
    return PolicyDocument(
        source, owner, service, hosts, tuple(principals), tuple(rules), connections
    )


def _hosts(reader: _Reader, raw: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_host(reader, h) for h in raw))  # `a` and `a:8443` are one


def _host(reader: _Reader, host: str) -> str:
    """Hosts are compared lowercase and without a port (`orders:8443` is `orders`)."""
    lowered = host.strip().lower()
    if lowered.startswith("["):
        raise reader.error("hosts", f"IP literal hosts are not supported: {host!r}")
    name, _, port = lowered.rpartition(":") if ":" in lowered else (lowered, "", "")
    if port and not port.isdigit():
        raise reader.error("hosts", f"invalid port in host {host!r}")
    if not name or any(c <= " " or c in "/\\@*" for c in name):
        raise reader.error("hosts", f"invalid host {host!r}")
    return name


def _principal(reader: _Reader, default_owner: str) -> PrincipalDecl:
    reader.reject_unknown({"name", "spiffe", "jwt", "owner", "limit"})
    name = reader.string("name")
    if not _NAME.match(name):
        raise reader.error("name", "must be lowercase letters, digits, '.', '_' or '-'")
    has_spiffe, has_jwt = reader.data.get("spiffe") is not None, reader.data.get("jwt") is not None
    if has_spiffe == has_jwt:
        raise reader.error("spiffe", "exactly one of 'spiffe' or 'jwt' is required")
    spiffe, jwt = "", None
    if has_spiffe:
        spiffe = reader.string("spiffe")
        _spiffe_pattern(reader, "spiffe", spiffe)
    else:
        jwt = _jwt(reader.child("jwt", reader.data["jwt"]))
    owner = reader.string("owner", required=False, default=default_owner)
    return PrincipalDecl(name, spiffe, owner, reader.source, _limit(reader), jwt, reader.line)


def _jwt(reader: _Reader) -> JwtMatch:
    reader.reject_unknown({"issuer", "subject", "claims"})
    issuer = reader.string("issuer")
    subject = reader.string("subject", required=False)
    raw = reader.data.get("claims") or {}
    if not isinstance(raw, Mapping):
        raise reader.error("claims", "must be a mapping of claim name to value")
    claims: list[tuple[str, str | int | bool]] = []
    for key, value in raw.items():
        if not _CLAIM.match(str(key)):
            raise reader.error("claims", f"invalid claim name {key!r}")
        if key in ("iss", "sub"):
            raise reader.error("claims", f"use 'issuer'/'subject' instead of claim {key!r}")
        if not isinstance(value, str | int | bool):
            raise reader.error("claims", f"claim {key!r}: value must be a string, number or bool")
        claims.append((str(key), value))
    if not subject and not claims:
        raise reader.error(
            "subject",
            "a jwt principal needs 'subject' or 'claims' "
            "(an issuer alone would match every token it signs)",
        )
    return JwtMatch(issuer, subject, tuple(sorted(claims)))


def _spiffe_pattern(reader: _Reader, key: str, value: str) -> SpiffePattern:
    try:
        return SpiffePattern.parse(value)
    except SpiffeIdError as exc:
        raise reader.error(key, f"invalid SPIFFE ID or pattern {value!r}: {exc}") from None


_RULE_FIELDS = {
    "name",
    "hosts",
    "methods",
    "path",
    "path_prefix",
    "path_regex",
    "headers",
    "when",
    "allow",
    "deny",
    "mode",
    "limit",
}


def _rule(reader: _Reader, default_hosts: tuple[str, ...], owner: str) -> RuleDecl:
    reader.reject_unknown(_RULE_FIELDS)
    name = reader.string("name")
    if not _NAME.match(name):
        raise reader.error("name", "must be lowercase letters, digits, '.', '_' or '-'")
    hosts = _hosts(reader, reader.string_list("hosts")) or default_hosts
    methods = frozenset(m.upper() for m in reader.string_list("methods"))
    for m in methods:
        if m not in METHODS:
            raise reader.error("methods", f"unknown HTTP method {m!r}")
    path = _path(reader)
    headers = _headers(reader)
    when = reader.string("when", required=False)
    condition = None
    if when:
        try:
            condition = compile_condition(when)
        except ConditionError as exc:
            raise reader.error("when", str(exc)) from None
    allow = reader.string_list("allow", list_only=True)
    deny = reader.string_list("deny", list_only=True)
    if not allow and not deny:
        raise reader.error("allow", "a rule needs 'allow' or 'deny' (default is deny)")
    for who_key, who in (("allow", allow), ("deny", deny)):
        for entry in who:
            if entry.startswith("spiffe://"):
                _spiffe_pattern(reader, who_key, entry)
            elif entry != "*" and not _NAME.match(entry):
                raise reader.error(
                    who_key, f"{entry!r} is neither a principal name nor a SPIFFE ID"
                )
    mode = reader.string("mode", required=False, default="enforce")
    if mode not in ("enforce", "dry-run"):
        raise reader.error("mode", "must be 'enforce' or 'dry-run'")
    return RuleDecl(
        name=name,
        hosts=hosts,
        methods=methods,
        path=path,
        allow=allow,
        deny=deny,
        mode=mode,
        limit=_limit(reader),
        source=reader.source,
        owner=owner,
        headers=headers,
        when=when,
        condition=condition,
        line=reader.line,
    )


def _path(reader: _Reader) -> PathMatch:
    given = [k for k in ("path", "path_prefix", "path_regex") if reader.data.get(k) is not None]
    if len(given) != 1:
        raise reader.error(
            "path",
            "exactly one of 'path' or 'path_prefix' is required "
            "(or 'path_regex' for an RE2 regular expression)",
        )
    key = given[0]
    value = reader.string(key)
    if key == "path_regex":
        if len(value) > MAX_REGEX_LENGTH:
            raise reader.error(key, f"longer than {MAX_REGEX_LENGTH} characters")
        compile_re2(reader, key, value)
        return PathMatch("regex", value)
    if not value.startswith("/"):
        raise reader.error(key, "must start with '/'")
    if any(part in (".", "..") for part in value.split("/")) or "//" in value:
        raise reader.error(key, "must be a normalized path (no '.', '..' or '//' segments)")
    if any(c in value for c in _PATH_CHARS_REJECTED):
        raise reader.error(key, "must not contain '%', '\\', '?' or '#'")
    if key == "path_prefix":
        value = value.rstrip("/") or "/"
    segments = value.split("/")[1:]
    names = []
    for seg in segments:
        if "{" in seg or "}" in seg:
            var = _VAR.match(seg)
            if var is None:
                raise reader.error(
                    key,
                    f"template segment {seg!r} must be a whole segment "
                    "'{name}' (lowercase name); use path_regex for more",
                )
            names.append(var.group(1))
    if len(set(names)) != len(names):
        raise reader.error(key, "template variable names must be unique")
    if names:
        return PathMatch("template" if key == "path" else "template_prefix", value)
    return PathMatch("exact" if key == "path" else "prefix", value)


def _quiet_re2() -> Any:
    options = re2.Options()
    options.log_errors = False  # no C++ log lines on stderr: the PolicyError says it all
    return options


_QUIET_RE2 = _quiet_re2()


def compile_re2(reader: _Reader, key: str, pattern: str) -> Any:
    try:
        return re2.compile(pattern, _QUIET_RE2)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        if isinstance(detail, bytes):  # the binding raises RE2's message as bytes
            detail = detail.decode("utf-8", "replace")
        raise reader.error(key, f"invalid RE2 regular expression {pattern!r}: {detail}") from None


def _headers(reader: _Reader) -> tuple[HeaderMatch, ...]:
    raw = reader.data.get("headers")
    if raw is None:
        return ()
    hdrs = reader.child("headers", raw)
    out = []
    for name, spec in hdrs.data.items():
        if not _HEADER.match(str(name)):
            raise hdrs.error(str(name), "header names must be lowercase HTTP header names")
        if name in (":method", ":path", ":authority", "host"):
            raise hdrs.error(str(name), "use the rule's methods/path/hosts instead")
        if isinstance(spec, str):
            out.append(HeaderMatch(name, "exact", spec))
            continue
        one = hdrs.child(str(name), spec)
        one.reject_unknown({"exact", "present", "regex"})
        if len(one.data) != 1:
            raise hdrs.error(str(name), "needs exactly one of 'exact', 'present' or 'regex'")
        if "exact" in one.data:
            value = one.data["exact"]
            if not isinstance(value, str):
                raise one.error("exact", "must be a string")
            out.append(HeaderMatch(name, "exact", value))
        elif "present" in one.data:
            present = one.data["present"]
            if not isinstance(present, bool):
                raise one.error("present", "must be true or false")
            out.append(HeaderMatch(name, "present" if present else "absent"))
        else:
            pattern = one.string("regex")
            if len(pattern) > MAX_REGEX_LENGTH:
                raise one.error("regex", f"longer than {MAX_REGEX_LENGTH} characters")
            compile_re2(one, "regex", pattern)
            out.append(HeaderMatch(name, "regex", pattern))
    return tuple(out)


def _limit(reader: _Reader) -> LimitDecl | None:
    raw = reader.data.get("limit")
    if raw is None:
        return None
    lim = reader.child("limit", raw)
    lim.reject_unknown({"rate", "period", "burst"})
    rate = lim.data.get("rate")
    if not isinstance(rate, int) or isinstance(rate, bool) or rate <= 0:
        raise lim.error("rate", "must be a positive integer")
    period_raw = lim.data.get("period", "1s")
    match = _PERIOD.match(str(period_raw))
    if not match or float(match.group(1)) <= 0:
        raise lim.error("period", "must be a duration like 1s, 500ms, 1m or 1h")
    period = float(match.group(1)) * _PERIOD_UNITS[match.group(2)]
    burst = lim.data.get("burst", rate)
    if not isinstance(burst, int) or isinstance(burst, bool) or burst <= 0:
        raise lim.error("burst", "must be a positive integer")
    return LimitDecl(rate, period, burst)
