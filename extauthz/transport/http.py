"""Envoy's HTTP authorization-service protocol (`http_service`), on uvloop with httptools.

Why a second transport: through Envoy, the gRPC hop costs ~200 µs of CPU per check in a
Python gRPC server and about as much in Envoy; a plain HTTP/1.1 check costs ~15 µs here and
half of Envoy's share (docs/benchmarks.md). The decision is the same: this module only turns
bytes into a `Request` and a `CheckResult` back into bytes; `App.run_check` decides.

The protocol (Envoy `ext_authz` with `http_service`): Envoy sends the original method, its path
after `path_prefix`, the original Host, and the headers its `allowed_headers` lets through, with
no body. Status 200 allows: the headers Envoy's `allowed_upstream_headers` match go to the
upstream, and `x-envoy-auth-headers-to-remove` names headers Envoy removes from it. Any other
status denies, with the body and the headers `allowed_client_headers` match. Headers that
`dynamic_metadata_from_headers` matches become Envoy dynamic metadata; they are named exactly
like the gRPC transport's metadata keys (`principal`, `rule`, `decision`, ...), so one
access-log format serves both transports.

Identity: Envoy's HTTP client sends neither the peer certificate nor `source.principal`. The
caller's identity is the `x-forwarded-client-cert` header the local sidecar set from the
verified mTLS peer (`forward_client_cert_details: SANITIZE_SET`, `set_current_client_cert_details:
{uri: true}`): exactly one element with exactly one URI. It is trusted only because this
channel is the sidecar's own (loopback, a unix socket, or mutual TLS with allowed clients;
`settings._validate_http` refuses anything else). No XFCC means no verified peer (a 401 unless
another configured credential, a JWT, identifies the caller); more than one element, more than
one URI, or a repeated header is ambiguous: 401, never an allow.

Bad input is refused before the core sees it, with a 4xx (a denial to Envoy) and a closed
connection: bytes that are not HTTP/1.1, a head larger than `max_head_bytes` (a 100 KB request
line, 10,000 headers), a body or Transfer-Encoding on a check, pipelined requests, HTTP/1.0, and
a head not finished within `header_timeout` (slowloris). Memory per connection is bounded by
`max_head_bytes`, and connections by `max_connections`.

Per check on the hot path: the httptools (llhttp, C) parse, a dict of headers, a memo lookup for
the XFCC value, the pipeline, and a memo lookup for the response bytes. No task is created
unless the check actually waits (a Redis limiter): the coroutine is driven synchronously first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import socket
import ssl
import stat
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httptools

from extauthz.app import App, strip_headers_of
from extauthz.decide.pipeline import REALM, CheckResult
from extauthz.identity.resolver import www_authenticate
from extauthz.identity.xfcc import XfccError, parse_xfcc, sidecar_element
from extauthz.memo import Memo
from extauthz.model import Decision, IdentityFailure, IdentitySource, Outcome, Reason, Request
from extauthz.settings import Settings, SettingsError, parse_listen_address
from extauthz.transport.answers import Answers
from extauthz.transport.listeners import BindError, reuse_port
from extauthz.transport.tls import TlsConfig

log = logging.getLogger("extauthz.http")

XFCC_HEADER = "x-forwarded-client-cert"
REASON_HEADER = "x-extauthz-reason"
# Envoy removes the headers this response header names from the upstream request.
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Response headers Envoy turns into dynamic metadata (`dynamic_metadata_from_headers`), named
# like the gRPC transport's metadata keys (grpc_proto._metadata).
METADATA_HEADERS = ("principal", "identity_source", "rule", "decision", "reason",
                    "policy_version")
# Headers the denial may carry to the client (`allowed_client_headers`).
CLIENT_HEADERS = (REASON_HEADER, "www-authenticate", "retry-after", "ratelimit-limit",
                  "ratelimit-remaining", "ratelimit-reset", "content-type")
BUDGET_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
XFCC_MEMO_SIZE = 4096
XFCC_MEMO_MAX_VALUE = 4096  # a sidecar's element (URI, Hash, even Cert=) is well under this

_STATUS_LINE = {
    200: b"HTTP/1.1 200 OK\r\n",
    400: b"HTTP/1.1 400 Bad Request\r\n",
    401: b"HTTP/1.1 401 Unauthorized\r\n",
    403: b"HTTP/1.1 403 Forbidden\r\n",
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    413: b"HTTP/1.1 413 Content Too Large\r\n",
    414: b"HTTP/1.1 414 URI Too Long\r\n",
    429: b"HTTP/1.1 429 Too Many Requests\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\n",
}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds of the listener; the defaults sit well above anything Envoy sends."""

    max_head_bytes: int = 64 * 1024  # request line + headers (Envoy's own default is 60 KiB)
    max_headers: int = 128
    header_timeout: float = 10.0  # first byte of a request -> end of its headers
    idle_timeout: float = 900.0  # a kept-alive connection without a request (Envoy: 300 s)
    max_connections: int = 1024
    sweep_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class HttpOptions:
    principal_header: str = "x-extauthz-principal"
    rule_header: str = ""
    strip_headers: tuple[str, ...] = ("x-extauthz-principal", "x-extauthz-rule")
    budget_headers: bool = False
    path_prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpOptions:
        return cls(
            principal_header=settings.principal_header,
            rule_header=settings.rule_header,
            strip_headers=strip_headers_of(settings),
            budget_headers=settings.ratelimit_budget_headers,
            path_prefix=settings.http_path_prefix,
        )


def _safe(value: str) -> bytes:
    """A header value as bytes that cannot end the header: control characters become '?'.
    What goes out is principals, rule names and versions the policy validated; this is the
    second line of defence, not the first."""
    if value.isprintable():
        return value.encode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in value).encode("utf-8")


def _headers(pairs: Sequence[tuple[str, str]]) -> bytes:
    return b"".join(k.encode("ascii") + b": " + _safe(v) + b"\r\n" for k, v in pairs)


def _metadata(decision: Decision) -> list[tuple[str, str]]:
    identity = decision.identity
    return [
        ("principal", decision.principal),
        ("identity_source", identity.source.value if identity is not None else ""),
        ("rule", decision.rule),
        ("decision", "allow" if decision.allowed else "deny"),
        ("reason", decision.reason.value),
        ("policy_version", decision.policy_version),
    ]


class Responses:
    """Response bytes, built once per distinct decision (see `respond`)."""

    def __init__(self, options: HttpOptions) -> None:
        self._options = options
        self._answers: Answers[bytes] = Answers(
            self.build,
            budget_headers=options.budget_headers,
        )

    def build(
        self, decision: Decision, extra: Sequence[tuple[str, str]] = (), status: int = 0,
        close: bool = False,
    ) -> bytes:
        options = self._options
        outcome = decision.outcome
        if outcome is Outcome.ALLOW:
            upstream = list(extra)
            if options.principal_header and decision.principal:
                upstream.append((options.principal_header, decision.principal))
            if options.rule_header and decision.rule:
                upstream.append((options.rule_header, decision.rule))
            # Headers we set overwrite the caller's copy (allowed_upstream_headers); the
            # others are removed outright, so a caller's copy never reaches the upstream.
            set_keys = {k for k, _ in upstream}
            remove = [h for h in options.strip_headers if h not in set_keys]
            if remove:
                upstream.append((REMOVE_HEADER, ",".join(remove)))
            head = _headers([*upstream, *_metadata(decision)])
            return _STATUS_LINE[200] + b"content-length: 0\r\n" + head + b"\r\n"
        code = status or outcome.http_status
        body = f"{code} {decision.reason.value}\n".encode()
        pairs = [(REASON_HEADER, decision.reason.value), *decision.headers, *extra,
                 *_metadata(decision)]
        return (
            _STATUS_LINE[code]
            + b"content-type: text/plain\r\n"
            + (b"connection: close\r\n" if close else b"")
            + b"content-length: " + str(len(body)).encode() + b"\r\n"
            + _headers(pairs) + b"\r\n" + body
        )

    def respond(self, result: CheckResult) -> bytes:
        """Memoized by everything `build` reads from a decision, as the gRPC servicer's are
        (transport/answers.py)."""
        return self._answers.answer(result)


@dataclass(frozen=True, slots=True)
class Peer:
    """What the sidecar's XFCC says about the verified mTLS peer."""

    principal: str = ""
    certificate: str = ""  # URL-encoded PEM (`Cert=`), as Envoy's gRPC `source.certificate`
    problem: str = ""  # non-empty: ambiguous or malformed, a 401


NO_PEER = Peer()


def peer_from_xfcc(value: str) -> Peer:
    """The single element SANITIZE_SET produces, with its single URI SAN."""
    try:
        elements = parse_xfcc(value)
    except XfccError as exc:
        return Peer(problem=f"malformed {XFCC_HEADER}: {exc}")
    try:
        # Envoy writes URI=/DNS= unescaped: the element rules (identity/xfcc.py) refuse what a
        # SAN with ',' or ';' could add, and bind Hash=/Cert=/Chain= to one certificate.
        element = sidecar_element(elements)
    except XfccError as exc:
        return Peer(problem=f"{XFCC_HEADER}: {exc}")
    return Peer(principal=element.uri, certificate=element.cert)


HEADER_NAME_MEMO_SIZE = 1024  # raw header name -> lowercase str: a mesh sends few names


def _name(raw: bytes) -> str:
    return raw.decode("latin-1").lower()


class _Refused(Exception):
    """Raised inside a parser callback: answer `status`, record a denial, close."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _ambiguous(problem: str, version: str) -> Decision:
    failure = IdentityFailure(Reason.INVALID_IDENTITY, problem, IdentitySource.MTLS)
    return Decision(
        Outcome.UNAUTHENTICATED,
        Reason.INVALID_IDENTITY,
        problem,
        policy_version=version,
        failure_source=IdentitySource.MTLS,
        headers=(("www-authenticate", www_authenticate(failure, REALM)),),
    )


async def _resume(coro: Coroutine[Any, Any, CheckResult], yielded: Any) -> CheckResult:
    """Finish a coroutine that was started synchronously and suspended on `yielded`, the way
    an asyncio Task would have: wait for what it waits for, then send it on."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                # What a Task does with a future its coroutine yields: take it over.
                yielded._asyncio_future_blocking = False
                await yielded
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception:  # noqa: S110 - the coroutine reads the outcome from the future itself
            pass
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            result: CheckResult = done.value
            return result


class CheckConnection(asyncio.Protocol):
    """One connection from Envoy's authz cluster: requests in order, one at a time."""

    def __init__(self, server: HttpCheckServer) -> None:
        self._server = server
        self._names = server.header_names
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._duplicates: set[str] = set()
        self._count = 0
        self._head_bytes = 0
        self._in_head = False  # between the first byte of a request and its end of headers
        self._started = 0.0
        self._busy = False  # a check is being decided asynchronously
        self._completed = 0  # requests completed during the current data_received
        self._closing = False
        self._pending_refusal: tuple[int, str] | None = None
        # Sweeps since the head began or the last answer (a clock read per check costs more).
        self.ticks = 0

    # asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        server = self._server
        if len(server.connections) >= server.limits.max_connections:
            log.warning("HTTP connection refused: too many connections",
                        extra={"event": "http_connection_limit"})
            transport.abort()
            return
        refusal = server.refuse_peer(transport)
        if refusal:
            log.warning("HTTP client refused", extra={"event": "client_refused",
                                                       "detail": refusal})
            transport.abort()
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # answers are one small write each
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        # Every byte of a check is head (a body is refused), counted before the parser sees
        # it: httptools keeps a header's bytes until the header ends, too late to bound them.
        self._head_bytes += len(data)
        limit = self._server.limits.max_head_bytes
        if self._head_bytes > limit:
            self._refuse(431, f"request head larger than {limit} bytes")
            return
        self._completed = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.detail)
            else:
                log.error("HTTP check handling failed", exc_info=cause,
                          extra={"event": "check_error"})
                self._refuse(400, "request could not be handled")
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrade or CONNECT on a check")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"not HTTP/1.1: {exc}")

    # httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._busy or self._completed:
            raise _Refused(400, "pipelined requests are not accepted")
        self._in_head = True
        self.ticks = 0
        app = self._server.app
        self._started = app.clock() if app.observers else 0.0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        if self._count > self._server.limits.max_headers:
            raise _Refused(431, f"more than {self._server.limits.max_headers} headers")
        key = self._names.get(name)
        if key is None:
            key = self._names.put(name, _name(name))
        text = value.decode("utf-8", "replace")
        headers = self._headers
        if key in headers:
            self._duplicates.add(key)
            headers[key] = f"{headers[key]},{text}"
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        if parser.get_http_version() != "1.1":
            raise _Refused(400, f"HTTP/{parser.get_http_version()} is not accepted; Envoy "
                                "speaks HTTP/1.1")
        headers = self._headers
        if "transfer-encoding" in headers:
            raise _Refused(400, "transfer-encoding on a check (a check carries no body)")
        length = headers.get("content-length")
        if length is not None and length != "0":
            raise _Refused(413, "a request body on a check (extauthz reads none)")
        if "host" in self._duplicates:
            raise _Refused(400, "more than one Host header")

    def on_body(self, body: bytes) -> None:
        raise _Refused(413, "a request body on a check (extauthz reads none)")

    def on_message_complete(self) -> None:
        self._completed += 1
        server = self._server
        app = server.app
        started = self._started
        request, problem = self._request()
        self._reset()
        if problem is not None:
            self._write(server.responses.respond(app.record(request, problem, started)))
            return
        coro = app.run_check(request, started)
        try:
            yielded = coro.send(None)
        except StopIteration as done:
            self._write(server.responses.respond(done.value))
            return
        # The check waits (e.g. on Redis): finish it in a task; nothing else is read meanwhile.
        self._busy = True
        task = asyncio.get_running_loop().create_task(_resume(coro, yielded))
        server.tasks.add(task)
        task.add_done_callback(self._finished)

    # ----------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._url = b""
        self._headers = {}
        self._duplicates = set()
        self._count = 0
        self._head_bytes = 0

    def _request(self) -> tuple[Request | None, Decision | None]:
        """The Request for the core, or the denial the transport decides itself."""
        url = self._url
        server = self._server
        if not url.startswith(b"/") or not url.isascii():
            raise _Refused(400, "request target must be an ASCII origin-form path")
        path = url.decode("ascii")
        prefix = server.options.path_prefix
        if prefix:
            if not path.startswith(prefix) or path[len(prefix):len(prefix) + 1] != "/":
                raise _Refused(400, f"path outside the configured prefix {prefix!r}")
            path = path[len(prefix):]
        headers = self._headers
        xfcc = headers.pop(XFCC_HEADER, None)
        peer = NO_PEER if xfcc is None else server.peer(xfcc)
        request = Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            host=headers.get("host", ""),
            path=path,
            headers=headers,
            source_principal=peer.principal,
            peer_certificate=peer.certificate,
            transport="http",
        )
        problem = peer.problem
        if XFCC_HEADER in self._duplicates:
            problem = f"more than one {XFCC_HEADER} header"
        if problem:
            return request, _ambiguous(problem, server.app.authorizer.policy_version)
        return request, None

    def _finished(self, task: asyncio.Task[CheckResult]) -> None:
        self._server.tasks.discard(task)
        self._busy = False
        if task.cancelled():
            self._abort()
            return
        exc = task.exception()
        if exc is not None:  # run_check never raises; this is a bug, still a denial
            log.error("HTTP check failed", exc_info=exc, extra={"event": "check_error"})
            result = CheckResult(self._server.app.internal_error())
        else:
            result = task.result()
        self._write(self._server.responses.respond(result))
        if self._pending_refusal is not None:  # what arrived meanwhile, answered in order
            self._refuse(*self._pending_refusal)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(data)
        if self._server.draining and not self._busy:
            self._closing = True
            transport.close()
            return
        self.ticks = 0

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request that cannot be read, record it as a denial, and close."""
        if self._closing:
            return
        if self._busy:  # the answer in flight goes first
            if self._pending_refusal is None:
                self._pending_refusal = (status, detail)
                if self._transport is not None:
                    self._transport.pause_reading()
            return
        self._closing = True
        server = self._server
        version = server.app.authorizer.policy_version
        decision = Decision(Outcome.FORBIDDEN, Reason.MALFORMED_REQUEST, detail,
                            policy_version=version)
        server.app.record(None, decision, self._started or None)
        log.debug("HTTP request refused", extra={"event": "http_refused", "status": status,
                                                 "detail": detail})
        if self._transport is not None:
            self._transport.write(server.responses.build(decision, status=status, close=True))
            self._transport.close()

    def expire(self, head_ticks: int, idle_ticks: int) -> None:
        """Called by the sweep: a head not finished in time, or a connection idle too long.
        Counted in sweeps; the first sweep after a reset may come at once, so a deadline of
        k sweeps waits at least k - 1 intervals (see HttpCheckServer.sweep)."""
        if self._closing or self._busy:
            return
        self.ticks += 1
        if self._in_head:
            if self.ticks > head_ticks:
                self._refuse(408, "request head not finished in time")
        elif self.ticks > idle_ticks:
            self._closing = True
            if self._transport is not None:
                self._transport.close()

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def abort_unless_closing(self) -> None:
        if not self._closing:
            self._abort()

    def close_if_idle(self) -> None:
        if not self._busy and not self._in_head and not self._closing:
            self._closing = True
            if self._transport is not None:
                self._transport.close()


class HttpCheckServer:
    """The shared state of every connection: app, limits, memos, the connection set."""

    def __init__(self, app: App, options: HttpOptions, limits: HttpLimits,
                 tls: TlsConfig | None = None) -> None:
        self.app = app
        self.options = options
        self.limits = limits
        self.tls = tls
        self.responses = Responses(options)
        self.connections: set[CheckConnection] = set()
        self.tasks: set[asyncio.Task[CheckResult]] = set()
        self.draining = False
        self._peers: Memo[str, Peer] = Memo(XFCC_MEMO_SIZE)
        self.header_names: Memo[bytes, str] = Memo(HEADER_NAME_MEMO_SIZE)

    def peer(self, xfcc: str) -> Peer:
        """The XFCC value's peer, memoized: a mesh has few callers, parsing costs more."""
        found = self._peers.get(xfcc)
        if found is None:
            found = peer_from_xfcc(xfcc)
            if len(xfcc) <= XFCC_MEMO_MAX_VALUE:  # entries x size stays bounded (~16 MiB)
                self._peers.put(xfcc, found)
        return found

    def refuse_peer(self, transport: asyncio.Transport) -> str:
        """"" to admit the connection; else why not (mutual TLS with an unlisted client)."""
        if self.tls is None or transport.get_extra_info("ssl_object") is None:
            return ""
        cert = transport.get_extra_info("peercert") or {}
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"
                and str(v).startswith("spiffe://")]
        if len(uris) != 1:
            return "client certificate has no single SPIFFE ID"
        if not self.tls.allows(uris[0]):
            return f"{uris[0]} may not call extauthz"
        return ""

    def sweep(self) -> None:
        limits = self.limits
        head = math.ceil(limits.header_timeout / limits.sweep_interval)
        idle = math.ceil(limits.idle_timeout / limits.sweep_interval)
        for connection in list(self.connections):
            connection.expire(head, idle)


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """Mutual TLS: a client certificate chaining to the client CA is required. The files are
    re-read when they change (SVIDs rotate), for the next handshake, without a restart."""

    def build() -> tuple[str, ssl.SSLContext]:
        cert, key, ca = tls.read()
        digest = hashlib.sha256(cert + b"\0" + key + b"\0" + ca).hexdigest()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        _load_chain(context, cert, key)
        context.set_alpn_protocols(["http/1.1"])
        return digest, context

    state = dict(zip(("digest", "context"), build(), strict=True))
    base: ssl.SSLContext = state["context"]  # type: ignore[assignment]

    def rotate(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        try:
            digest, fresh = build()
        except (SettingsError, ssl.SSLError, OSError) as exc:  # mid-rotation: keep the old
            log.warning("TLS files unreadable; keeping the previous ones",
                        extra={"event": "tls_reload_failed", "error": str(exc)})
            return
        if digest != state["digest"]:
            state["digest"], state["context"] = digest, fresh
            log.info("TLS certificate reloaded", extra={"event": "tls_reloaded"})
        current = state["context"]
        if current is not base:
            ssl_object.context = current

    base.sni_callback = rotate
    return base


def _load_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ssl can load a certificate chain only from files: write them to a private temporary
    directory and remove it at once."""
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="extauthz-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        context.load_cert_chain(cert_path, key_path)


class HttpTransport:
    """`--http-listen`: Envoy's HTTP authorization-service protocol."""

    name = "http"

    def __init__(self, app: App, limits: HttpLimits | None = None) -> None:
        self.app = app
        self.server = HttpCheckServer(app, HttpOptions.from_settings(app.settings),
                                      limits or HttpLimits(),
                                      TlsConfig.from_settings(app.settings))
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        settings = self.app.settings
        loop = asyncio.get_running_loop()
        state = self.server
        try:
            context = _ssl_context(state.tls) if state.tls is not None else None
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(f"tls_cert/tls_key/tls_client_ca: unusable for the HTTP "
                                f"listener: {exc}") from None
        bound: list[str] = []
        for addr in settings.http_listen:
            host, where = parse_listen_address(addr)
            if host == "unix":
                path = str(where)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)  # a stale socket from a previous run
                previous = os.umask(0o777 & ~settings.socket_mode)
                try:
                    server = await loop.create_unix_server(
                        lambda: CheckConnection(state), path, backlog=1024)
                except OSError as exc:  # the host refused a valid setting: exit 1 (issue 19)
                    raise BindError(f"http_listen: cannot bind {addr}: "
                                    f"{exc.strerror or exc}") from None
                finally:
                    os.umask(previous)
                os.chmod(path, settings.socket_mode)
                bound.append(f"http+{addr}")
            else:
                try:
                    server = await loop.create_server(
                        lambda: CheckConnection(state), str(host), int(where), backlog=1024,
                        reuse_port=reuse_port(), ssl=context)
                except OSError as exc:  # only a supervisor's workers share a port (issue 19)
                    raise BindError(f"http_listen: cannot bind {addr}: "
                                    f"{exc.strerror or exc}") from None
                port = server.sockets[0].getsockname()[1]
                bound.append(f"http://{host}:{port}")
            self._servers.append(server)
        self._sweeper = asyncio.create_task(self._sweep())
        return bound

    async def _sweep(self) -> None:
        interval = self.server.limits.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.server.sweep()
            except Exception:  # a sweep that stopped would leave slow heads open forever
                log.exception("HTTP connection sweep failed", extra={"event": "http_sweep_error"})

    async def set_serving(self, serving: bool) -> None:
        """Nothing to tell: Envoy's HTTP health checks are not served here (see docs)."""

    async def stop(self, grace: float) -> None:
        state = self.server
        state.draining = True
        for server in self._servers:
            server.close()
        for connection in list(state.connections):
            connection.close_if_idle()
        if state.tasks:
            await asyncio.wait(set(state.tasks), timeout=grace)
        for connection in list(state.connections):
            connection.abort_unless_closing()  # a closing one still flushes its last answer
        if self._sweeper is not None:
            self._sweeper.cancel()
        for addr in self.app.settings.http_listen:
            if addr.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(addr[len("unix:"):])


__all__: Sequence[str] = (
    "CLIENT_HEADERS",
    "METADATA_HEADERS",
    "HttpLimits",
    "HttpOptions",
    "HttpTransport",
    "Peer",
    "Responses",
    "peer_from_xfcc",
)
