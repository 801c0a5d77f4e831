"""The policy document: what service teams write, checked field by field.

`parse_document` validates parsed YAML data (plain dicts and lists, as `load_yaml` returns
them with their lines) into the typed, immutable declarations of `decls.py`: principals, HTTP
rules and connection rules, all through one `Reader`, one name syntax and one check of who a
rule names, so every error says `file: field (line N)`. Reading files lives in
sources/policy_store.py; turning declarations into lookup tables lives in compiled.py. Unknown
fields are errors, not warnings: a typo in a security policy (`alow:`) must never silently
widen or narrow access. So are duplicate keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import re2

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern
from extauthz.policy.conditions import ConditionError, compile_condition
from extauthz.policy.decls import (
    METHODS,
    VAR,
    WRITE_METHODS,
    ConnectionRuleDecl,
    HeaderMatch,
    JwtMatch,
    LimitDecl,
    PathMatch,
    PolicyDocument,
    PrincipalDecl,
    RuleDecl,
)
from extauthz.policy.reader import LineMap, PolicyError, Reader, line_of, load_yaml

__all__ = [
    "API_VERSION",
    "METHODS",
    "WRITE_METHODS",
    "ConnectionRuleDecl",
    "HeaderMatch",
    "JwtMatch",
    "LimitDecl",
    "LineMap",
    "PathMatch",
    "PolicyDocument",
    "PolicyError",
    "PrincipalDecl",
    "Reader",
    "RuleDecl",
    "line_of",
    "load_yaml",
    "parse_document",
]

API_VERSION = "extauthz/v1"
MAX_REGEX_LENGTH = 1024
# Names of principals, rules and connection rules. Fixed, not author-supplied.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$")
_NAME_RULE = "must be lowercase letters, digits, '.', '_' or '-'"
_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,128}$")  # fixed: lowercase header token
_CLAIM = re.compile(r"^[A-Za-z0-9_.:/@$-]{1,256}$")  # fixed
_PERIOD = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_PERIOD_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_PATH_CHARS_REJECTED = "%\\?#"
_CONNECTION_FIELDS = {"name", "ports", "sni", "allow"}


def parse_document(data: object, source: str) -> PolicyDocument:
    """Validate one parsed policy file. Raises PolicyError naming file, field and line."""
    if not isinstance(data, Mapping):
        raise PolicyError(source, "", "a policy file must be a YAML mapping")
    top = Reader.of(source, "", data)
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
    connections = _connections(top)
    return PolicyDocument(
        source, owner, service, hosts, tuple(principals), tuple(rules), connections
    )


def _hosts(reader: Reader, raw: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_host(reader, h) for h in raw))  # `a` and `a:8443` are one


def _host(reader: Reader, host: str) -> str:
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


def _principal(reader: Reader, default_owner: str) -> PrincipalDecl:
    reader.reject_unknown({"name", "spiffe", "jwt", "owner", "limit"})
    name = _name(reader)
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


def _jwt(reader: Reader) -> JwtMatch:
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


def _spiffe_pattern(reader: Reader, key: str, value: str) -> SpiffePattern:
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


def _rule(reader: Reader, default_hosts: tuple[str, ...], owner: str) -> RuleDecl:
    reader.reject_unknown(_RULE_FIELDS)
    name = _name(reader)
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
    _callers(reader, "allow", allow)
    _callers(reader, "deny", deny)
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


def _path(reader: Reader) -> PathMatch:
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
            var = VAR.match(seg)
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


def compile_re2(reader: Reader, key: str, pattern: str) -> Any:
    try:
        return re2.compile(pattern, _QUIET_RE2)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else ""
        if isinstance(detail, bytes):  # the binding raises RE2's message as bytes
            detail = detail.decode("utf-8", "replace")
        raise reader.error(key, f"invalid RE2 regular expression {pattern!r}: {detail}") from None


def _headers(reader: Reader) -> tuple[HeaderMatch, ...]:
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


def _limit(reader: Reader) -> LimitDecl | None:
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


def _name(reader: Reader) -> str:
    name = reader.string("name")
    if not _NAME.match(name):
        raise reader.error("name", _NAME_RULE)
    return name


def _callers(reader: Reader, key: str, entries: tuple[str, ...]) -> None:
    """Who an allow/deny list names: `*`, a SPIFFE ID or pattern, or a principal's name (its
    declaration is looked up when compiling, across all documents)."""
    for entry in entries:
        if entry.startswith("spiffe://"):
            _spiffe_pattern(reader, key, entry)
        elif entry != "*" and not _NAME.match(entry):
            raise reader.error(key, f"{entry!r} is neither a principal name nor a SPIFFE ID")


def _connections(top: Reader) -> tuple[ConnectionRuleDecl, ...]:
    """The document's `connections:` (rules for Envoy's network ext_authz filter)."""
    raw = top.data.get("connections")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise top.error("connections", "must be a list")
    rules: dict[str, ConnectionRuleDecl] = {}
    for i, item in enumerate(raw):
        reader = top.child("connections", item, i)
        reader.reject_unknown(_CONNECTION_FIELDS)
        name = _name(reader)
        if name in rules:
            raise reader.error("name", f"rule name {name!r} is used twice")
        ports = reader.data.get("ports")
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = [ports]
        if not isinstance(ports, list) or not ports or not all(_port(p) for p in ports):
            raise reader.error("ports", "must be a list of ports (1-65535)")
        sni = reader.string_list("sni")
        allow = reader.string_list("allow", list_only=True)
        if not allow:
            raise reader.error("allow", "is required (default is deny)")
        _callers(reader, "allow", allow)
        rules[name] = ConnectionRuleDecl(
            name, frozenset(ports), frozenset(s.lower() for s in sni), allow,
            reader.source, reader.line,
        )
    return tuple(rules.values())


def _port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 65535
