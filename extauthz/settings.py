"""Server settings: validated once, here, then passed down; never read from globals.

Precedence: command-line flag > `EXTAUTHZ_*` environment variable > config file > default.
Every check of a value (ranges, listen addresses, TLS all-or-none, workers, header names, the
`identity:` section) runs when a `Settings` is made, however it is made (flags, environment,
file, or code), so no later stage validates settings again or sees an invalid one. Only what
needs I/O (reading certificates, binding ports) is checked where it happens.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from extauthz import headers
from extauthz.backends.redis_url import parse_redis_url
from extauthz.identity.resolver import IdentityConfig
from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern

ENV_PREFIX = "EXTAUTHZ_"


class SettingsError(ValueError):
    """Bad configuration; the message names the setting and where it came from."""


@dataclass(frozen=True, slots=True)
class Settings:
    policy: Path | None = None
    listen: tuple[str, ...] = ("127.0.0.1:9191",)
    # Envoy's HTTP authorization-service protocol (`http_service`), see transport/http.py.
    # Given alone (no `listen` from any source), only HTTP is served.
    http_listen: tuple[str, ...] = ()
    # What Envoy's `http_service.path_prefix` puts before the original path ("" = nothing).
    http_path_prefix: str = ""
    grace_period: float = 10.0
    socket_mode: int = 0o660
    watch_interval: float = 2.0
    cache_size: int = 100_000
    cache_ttl: float = 60.0
    trust_domains: tuple[str, ...] = ()
    principal_header: str = headers.PRINCIPAL
    # Header carrying the name of the rule that allowed the request ("" = not sent).
    rule_header: str = ""
    limiter_max_keys: int = 100_000
    # Rate-limit state: "memory" (per process) or "redis" (shared, exact across replicas).
    rate_limit_backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Per-check deadline, sized from measured latency (docs/rate-limits.md, "Deadline").
    redis_timeout: float = 0.15
    # When Redis is down or slow: "closed" (503), "open" (allow), "local" (per-process limits).
    redis_failure_mode: str = "closed"
    # Add ratelimit-limit/-remaining/-reset to allowed requests on their way upstream.
    ratelimit_budget_headers: bool = False
    log_level: str = "info"
    identity: Mapping[str, Any] = field(default_factory=dict)
    # Observability (issue 7; see docs/observability.md).
    decision_log: str = "stdout"  # stdout | none | PATH (appended to; reopened on rotation)
    decision_log_sample_allowed: float = 1.0  # share of allowed decisions logged (0..1)
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; "" = no metrics
    tracing: bool = True  # spans per check (OTEL_* env configures the SDK)
    # Server processes sharing the TCP port(s) (SO_REUSEPORT); see extauthz/transport/workers.py.
    workers: int = 1
    # YAML list of revoked principals / token ids, re-read on change like the policy.
    revocation_file: Path | None = None
    # Mutual TLS on the TCP listeners (see grpc_tls.py): server certificate and key, the CA of
    # the clients' certificates, and the SPIFFE IDs / patterns that may call. All or none.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_allowed_clients: tuple[str, ...] = ()
    # The `identity:` section with `trust_domains` merged in, typed: what the resolver takes.
    identity_config: IdentityConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "identity_config", _identity_config(self))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif f.name == "socket_mode":
                value = f"{value:04o}"
            out[f.name] = value
        return out


def _coerce(name: str, raw: object, origin: str) -> object:
    default = Settings.__dataclass_fields__[name].default
    try:
        if name in ("policy", "revocation_file"):
            return Path(str(raw))
        if name == "identity":
            if not isinstance(raw, Mapping):
                raise TypeError("must be a mapping")
            return dict(raw)
        if name == "socket_mode":
            return int(str(raw), 8)
        if isinstance(default, tuple):
            if isinstance(raw, str):
                items = [s.strip() for s in raw.split(",") if s.strip()]
            elif isinstance(raw, list | tuple):
                items = [str(s) for s in raw]
            else:
                raise TypeError("must be a list")
            return tuple(items)
        if isinstance(default, bool):
            word = str(raw).lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("must be true or false")
            return word in ("1", "true", "yes", "on")
        if isinstance(default, int):
            value = int(str(raw))
            if value < 0:
                raise ValueError("must not be negative")
            return value
        if isinstance(default, float):
            fvalue = float(str(raw))
            if fvalue < 0:
                raise ValueError("must not be negative")
            return fvalue
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{name} (from {origin}): invalid value {raw!r}: {exc}") from None


def load_settings(
    flags: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> Settings:
    names = {f.name for f in fields(Settings) if f.init}
    values: dict[str, object] = {}
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text())
        except OSError as exc:
            raise SettingsError(f"config file {config_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise SettingsError(
                f"config file {config_file}: not UTF-8 text (byte {exc.start}); expected YAML"
            ) from None
        except yaml.YAMLError as exc:  # one line: where and what, not PyYAML's excerpt
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise SettingsError(
                f"config file {config_file}:{where}: invalid YAML: {problem}"
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SettingsError(f"config file {config_file}: must be a mapping")
        for key, raw in data.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise SettingsError(f"config file {config_file}: unknown setting {key!r}")
            values[name] = _coerce(name, raw, f"config file {config_file}")
    for name in names:
        env = ENV_PREFIX + name.upper()
        if env in environ and environ[env] != "":
            values[name] = _coerce(name, environ[env], f"environment variable {env}")
    for name, raw in flags.items():
        if raw is not None and name in names:
            values[name] = _coerce(name, raw, f"flag --{name.replace('_', '-')}")
    if values.get("http_listen") and "listen" not in values:
        values["listen"] = ()  # --http-listen alone: no gRPC listener on the default port
    return Settings(**values)  # type: ignore[arg-type]  # validated by Settings itself


def _validate(s: Settings) -> None:
    """Every check of a value, by job; each raises SettingsError naming the setting."""
    _check_listeners(s)
    _validate_http(s)
    if s.workers < 1:
        raise SettingsError("workers: must be at least 1")
    if s.workers > 1:
        _check_workers(s)
    _check_observability(s)
    _check_tls(s)
    _check_headers(s)
    _check_rate_limits(s)
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError(
            f"log_level: must be debug, info, warning or error, not {s.log_level!r}"
        )


def _check_listeners(s: Settings) -> None:
    if not s.listen and not s.http_listen:
        raise SettingsError("listen: at least one address (listen or http_listen) is required")
    for addr in s.listen:
        parse_listen_address(addr)


def _check_observability(s: Settings) -> None:
    if not 0.0 <= s.decision_log_sample_allowed <= 1.0:
        raise SettingsError("decision_log_sample_allowed: must be between 0 and 1, not "
                            f"{s.decision_log_sample_allowed}")
    if s.metrics_listen:
        if s.metrics_listen.startswith("unix:"):
            raise SettingsError("metrics_listen: expected HOST:PORT, not a unix socket")
        try:
            parse_listen_address(s.metrics_listen)
        except SettingsError:
            raise SettingsError(
                f"metrics_listen: expected HOST:PORT, got {s.metrics_listen!r}") from None


def _check_headers(s: Settings) -> None:
    for name in ("principal_header", "rule_header"):
        value = getattr(s, name)
        problem = headers.settable_problem(value) if value else ""
        if problem:
            raise SettingsError(f"{name}: {problem}")
    if s.rule_header and s.rule_header == s.principal_header:
        raise SettingsError("rule_header: must differ from principal_header")


def _check_rate_limits(s: Settings) -> None:
    if s.rate_limit_backend not in ("memory", "redis"):
        raise SettingsError(
            f"rate_limit_backend: must be memory or redis, not {s.rate_limit_backend!r}"
        )
    if s.redis_failure_mode not in ("closed", "open", "local"):
        raise SettingsError(
            f"redis_failure_mode: must be closed, open or local, not {s.redis_failure_mode!r}"
        )
    if s.redis_timeout <= 0:
        raise SettingsError("redis_timeout: must be greater than 0")
    if s.rate_limit_backend == "redis":
        try:
            parse_redis_url(s.redis_url)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None


def _validate_http(s: Settings) -> None:
    """The HTTP transport trusts the XFCC header it receives (the caller's identity), so its
    channel must be the sidecar's own: loopback, a unix socket, or mutual TLS."""
    tls = bool(s.tls_cert or s.tls_key or s.tls_client_ca or s.tls_allowed_clients)
    for addr in s.http_listen:
        host, _ = parse_listen_address(addr)
        if host != "unix" and not tls and not _is_loopback(str(host)):
            raise SettingsError(
                f"http_listen: {addr} is not loopback and has no TLS: the HTTP transport "
                "trusts the x-forwarded-client-cert header as the caller's identity, so anyone "
                "who can reach it could claim any identity. Listen on 127.0.0.1:PORT or "
                "unix:/path, or add --tls-cert/--tls-key/--tls-client-ca/--tls-allowed-clients"
            )
    prefix = s.http_path_prefix
    if prefix and (not prefix.startswith("/") or prefix.endswith("/") or "?" in prefix
                   or any(c <= " " for c in prefix)):
        raise SettingsError(
            f"http_path_prefix: {prefix!r} must start with '/', not end with '/', and hold no "
            "query or spaces (it is Envoy's http_service.path_prefix)"
        )


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_workers(s: Settings) -> None:
    for addr in (*s.listen, *s.http_listen):
        host, port = parse_listen_address(addr)
        if host == "unix":
            raise SettingsError(
                "workers: a unix socket cannot be shared by several workers; listen on "
                "HOST:PORT (SO_REUSEPORT) or run one worker per socket"
            )
        if port == 0:
            raise SettingsError("workers: port 0 would give every worker its own port")


def _check_tls(s: Settings) -> None:
    """Mutual TLS on the listeners is all or nothing: certificate, key, client CA and the
    SPIFFE IDs that may call. (Reading the files is the transport's job, at start-up.)"""
    given = {"tls_cert": s.tls_cert, "tls_key": s.tls_key, "tls_client_ca": s.tls_client_ca}
    if not any(given.values()) and not s.tls_allowed_clients:
        return
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise SettingsError(
            f"{', '.join(missing)}: required with TLS (server certificate, key and the CA "
            "that issued the clients' certificates: TLS here always means mutual TLS)"
        )
    if not s.tls_allowed_clients:
        raise SettingsError(
            "tls_allowed_clients: required with TLS: the SPIFFE IDs (or patterns) of the "
            "Envoys that may call extauthz"
        )
    for entry in s.tls_allowed_clients:
        try:
            SpiffePattern.parse(entry)
        except SpiffeIdError as exc:
            raise SettingsError(
                f"tls_allowed_clients: invalid SPIFFE ID or pattern {entry!r}: {exc}"
            ) from None


def _identity_config(s: Settings) -> IdentityConfig:
    try:
        config = IdentityConfig.from_mapping(s.identity)
        if s.trust_domains:
            domains = config.trust_domains | frozenset(s.trust_domains)
            config = IdentityConfig.from_mapping({**s.identity, "trust_domains": sorted(domains)})
    except (ValueError, TypeError) as exc:
        raise SettingsError(f"identity: {exc}") from None
    return config


def parse_listen_address(addr: str) -> tuple[str, str | int]:
    """`unix:/path` -> ("unix", "/path"); `host:port` -> (host, port)."""
    if addr.startswith("unix:"):
        path = addr[len("unix:") :]
        if not path.startswith("/"):
            raise SettingsError(f"listen: unix socket path must be absolute: {addr!r}")
        return ("unix", path)
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"listen: expected HOST:PORT or unix:/path, got {addr!r}")
    return (host, int(port))


def environ() -> Mapping[str, str]:
    return os.environ
