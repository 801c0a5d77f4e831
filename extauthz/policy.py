"""The policy document: what service teams write, checked field by field.

This module only validates already-parsed YAML data (plain dicts and lists) into typed,
immutable declarations. Reading files lives in `policy_store.py`; turning declarations into
fast lookup structures lives in `matcher.py`. Unknown fields are errors, not warnings: a typo
in a security policy (`alow:`) must never silently widen or narrow access.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from extauthz.spiffe import SpiffeIdError, SpiffePattern

API_VERSION = "extauthz/v1"
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")  # fixed, not author-supplied
_PERIOD = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_PERIOD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class PolicyError(ValueError):
    """A policy that cannot be loaded; names the file and the offending field."""

    def __init__(self, source: str, field_path: str, message: str, line: int | None = None):
        self.source = source
        self.field_path = field_path
        self.message = message
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field_path}: {message}" if field_path else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class LimitDecl:
    rate: int
    period: float
    burst: int


@dataclass(frozen=True, slots=True)
class PrincipalDecl:
    name: str
    spiffe: str  # an exact SPIFFE ID or a SpiffePattern
    owner: str
    source: str
    limit: LimitDecl | None = None


@dataclass(frozen=True, slots=True)
class PathMatch:
    kind: str  # "exact" | "prefix"
    value: str


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


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    source: str
    owner: str
    service: str
    hosts: tuple[str, ...]
    principals: tuple[PrincipalDecl, ...]
    rules: tuple[RuleDecl, ...]


@dataclass(slots=True)
class _Reader:
    """Walks one mapping, remembering the field path for error messages."""

    source: str
    path: str
    data: Mapping[str, object]
    lines: Mapping[str, int] = field(default_factory=dict)

    def error(self, key: str, message: str) -> PolicyError:
        where = f"{self.path}.{key}" if self.path else key
        return PolicyError(self.source, where, message, self.lines.get(key))

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

    def string_list(self, key: str, *, required: bool = False) -> tuple[str, ...]:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of non-empty strings")
        return tuple(value)

    def child(self, key: str, value: object, index: int | None = None) -> _Reader:
        where = f"{self.path}.{key}" if self.path else key
        if index is not None:
            where = f"{where}[{index}]"
        if not isinstance(value, Mapping):
            raise PolicyError(self.source, where, "must be a mapping")
        return _Reader(self.source, where, value)


def parse_document(data: object, source: str) -> PolicyDocument:
    """Validate one parsed policy file. Raises PolicyError naming file and field."""
    if not isinstance(data, Mapping):
        raise PolicyError(source, "", "a policy file must be a YAML mapping")
    top = _Reader(source, "", data)
    top.reject_unknown({"apiVersion", "owner", "service", "hosts", "principals", "rules"})
    version = top.string("apiVersion")
    if version != API_VERSION:
        raise top.error("apiVersion", f"must be {API_VERSION!r}, got {version!r}")
    owner = top.string("owner")
    service = top.string("service")
    hosts = tuple(_host(top, h) for h in top.string_list("hosts", required=True))
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
    return PolicyDocument(source, owner, service, hosts, tuple(principals), tuple(rules))


def _host(reader: _Reader, host: str) -> str:
    """Hosts are compared lowercase and without a port (`orders:8443` is `orders`)."""
    lowered = host.strip().lower()
    if lowered.startswith("["):
        raise reader.error("hosts", f"IP literal hosts are not supported: {host!r}")
    name = lowered.rsplit(":", 1)[0] if ":" in lowered else lowered
    if not name or any(c.isspace() for c in name):
        raise reader.error("hosts", f"invalid host {host!r}")
    return name


def _principal(reader: _Reader, default_owner: str) -> PrincipalDecl:
    reader.reject_unknown({"name", "spiffe", "owner", "limit"})
    name = reader.string("name")
    if not _NAME.match(name):
        raise reader.error("name", "must be lowercase letters, digits, '.', '_' or '-'")
    spiffe = reader.string("spiffe")
    _spiffe_pattern(reader, "spiffe", spiffe)
    owner = reader.string("owner", required=False, default=default_owner)
    return PrincipalDecl(name, spiffe, owner, reader.source, _limit(reader))


def _spiffe_pattern(reader: _Reader, key: str, value: str) -> SpiffePattern:
    try:
        return SpiffePattern.parse(value)
    except SpiffeIdError as exc:
        raise reader.error(key, f"invalid SPIFFE ID or pattern {value!r}: {exc}") from None


def _rule(reader: _Reader, default_hosts: tuple[str, ...], owner: str) -> RuleDecl:
    reader.reject_unknown(
        {"name", "hosts", "methods", "path", "path_prefix", "allow", "deny", "mode", "limit"}
    )
    name = reader.string("name")
    if not _NAME.match(name):
        raise reader.error("name", "must be lowercase letters, digits, '.', '_' or '-'")
    hosts = tuple(_host(reader, h) for h in reader.string_list("hosts")) or default_hosts
    methods = frozenset(m.upper() for m in reader.string_list("methods"))
    for m in methods:
        if m not in METHODS:
            raise reader.error("methods", f"unknown HTTP method {m!r}")
    exact = reader.data.get("path")
    prefix = reader.data.get("path_prefix")
    if (exact is None) == (prefix is None):
        raise reader.error("path", "exactly one of 'path' or 'path_prefix' is required")
    key = "path" if exact is not None else "path_prefix"
    value = reader.string(key)
    if not value.startswith("/"):
        raise reader.error(key, "must start with '/'")
    if any(part in (".", "..") for part in value.split("/")) or "//" in value:
        raise reader.error(key, "must be a normalized path (no '.', '..' or '//' segments)")
    if "%" in value or "\\" in value or "?" in value or "#" in value:
        raise reader.error(key, "must not contain '%', '\\', '?' or '#'")
    if key == "path_prefix":
        value = value.rstrip("/") or "/"
    allow = reader.string_list("allow")
    deny = reader.string_list("deny")
    if not allow and not deny:
        raise reader.error("allow", "a rule needs 'allow' or 'deny' (default is deny)")
    for who_key, who in (("allow", allow), ("deny", deny)):
        for entry in who:
            if entry.startswith("spiffe://"):
                _spiffe_pattern(reader, who_key, entry)
            elif entry != "*" and not _NAME.match(entry):
                raise reader.error(who_key, f"{entry!r} is neither a principal name nor a SPIFFE ID")
    mode = reader.string("mode", required=False, default="enforce")
    if mode not in ("enforce", "dry-run"):
        raise reader.error("mode", "must be 'enforce' or 'dry-run'")
    return RuleDecl(
        name=name,
        hosts=hosts,
        methods=methods,
        path=PathMatch("exact" if key == "path" else "prefix", value),
        allow=allow,
        deny=deny,
        mode=mode,
        limit=_limit(reader),
        source=reader.source,
        owner=owner,
    )


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
