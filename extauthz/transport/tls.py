"""TLS with client certificates on extauthz's own gRPC listener, and who may call it.

When extauthz is not beside Envoy on a unix socket (a shared authorizer, or Envoy in another
pod), the Check port is a network service like any other: anyone who can reach it could ask
questions about the policy, and a spoofed "authorizer" could answer Envoy. With
`--tls-cert/--tls-key/--tls-client-ca/--tls-allowed-clients`:

* the TCP listeners serve TLS and *require* a client certificate chaining to the client CA
  (`grpc.ssl_server_credentials(require_client_auth=True)` semantics); the certificate files
  are re-read when they change (SVIDs rotate hourly), on the next handshake, without a restart;
* every call except the gRPC health service must come from a certificate whose single URI SAN
  is a SPIFFE ID matching `tls_allowed_clients` (exact IDs or patterns, `*` = one segment):
  no SPIFFE ID is UNAUTHENTICATED, an unlisted one PERMISSION_DENIED. Envoy treats either as an
  error of the authorizer, which fails closed (503). The health service only needs the TLS
  handshake, so probes and Envoy's health checks work with any certificate from the CA.

Unix-socket listeners stay plaintext: they are guarded by the socket's file mode
(`--socket-mode`) and reachable only from inside the pod.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from extauthz.identity.spiffe import SpiffeIdError, SpiffePattern, parse_spiffe_id
from extauthz.settings import Settings, SettingsError

log = logging.getLogger("extauthz.tls")

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
_URI_PREFIX = "URI:"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path
    allowed_clients: tuple[SpiffePattern, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsConfig | None:
        """None when no TLS is configured. The settings were validated when made (all or
        none, valid client patterns); what is left to check needs I/O: the files are read
        now, so an unreadable one fails start-up, not the first handshake."""
        cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if not cert:
            return None
        patterns = [SpiffePattern.parse(entry) for entry in settings.tls_allowed_clients]
        config = cls(Path(str(cert)), Path(str(key)), Path(str(ca)), tuple(patterns))
        config.read()  # fail at start-up, not at the first handshake
        return config

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for name, path in (
            ("tls_cert", self.cert),
            ("tls_key", self.key),
            ("tls_client_ca", self.client_ca),
        ):
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
        return out[0], out[1], out[2]

    def allows(self, spiffe_id: str) -> bool:
        try:
            sid = parse_spiffe_id(spiffe_id)
        except SpiffeIdError:
            return False
        return any(p.matches(sid) for p in self.allowed_clients)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual-TLS server credentials that pick up rotated files on the next handshake."""
        cert, key, ca = self.read()
        state = {"digest": _digest(cert, key, ca)}

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                cert, key, ca = self.read()
            except SettingsError as exc:  # mid-rotation: keep the previous files
                log.warning(
                    "TLS files unreadable; keeping the previous ones",
                    extra={"event": "tls_reload_failed", "error": str(exc)},
                )
                return None
            digest = _digest(cert, key, ca)
            if digest == state["digest"]:
                return None
            state["digest"] = digest
            log.info("TLS certificate reloaded", extra={"event": "tls_reloaded"})
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=True
        )


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def peer_spiffe_id(auth_context: dict[str, list[bytes]]) -> str | None:
    """The caller's SPIFFE ID: the single URI SAN of its verified certificate, else None."""
    uris = [
        v.decode("utf-8", "replace")
        for v in auth_context.get("x509_subject_alternative_name", ())
        if v.startswith(b"spiffe://")
    ]
    if len(uris) != 1:
        return None
    return uris[0]


class ClientIdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits a call only from an allowed SPIFFE ID (see the module docstring)."""

    def __init__(self, config: TlsConfig) -> None:
        self._config = config

    def refusal(self, context: Any) -> tuple[grpc.StatusCode, str] | None:
        """None to admit the call, else the status to refuse it with."""
        peer = str(context.peer() or "")
        if peer.startswith("unix:"):
            return None  # plaintext by design: guarded by the socket's file mode
        auth = context.auth_context() or {}
        if auth.get("transport_security_type") != [b"ssl"]:
            return grpc.StatusCode.UNAUTHENTICATED, "mutual TLS is required"
        spiffe_id = peer_spiffe_id(auth)
        if spiffe_id is None:
            return grpc.StatusCode.UNAUTHENTICATED, "client certificate has no single SPIFFE ID"
        if not self._config.allows(spiffe_id):
            return grpc.StatusCode.PERMISSION_DENIED, f"{spiffe_id} may not call extauthz"
        return None

    async def _enforce(self, context: Any, method: str) -> None:
        refused = self.refusal(context)
        if refused is not None:
            log.warning(
                "gRPC client refused",
                extra={
                    "event": "client_refused",
                    "method": method,
                    "peer": context.peer(),
                    "code": refused[0].name,
                    "detail": refused[1],
                },
            )
            await context.abort(refused[0], refused[1])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(HEALTH_SERVICE_PREFIX):
            return handler
        return self._wrap(handler, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        enforce = self._enforce
        ser = handler.response_serializer
        de = handler.request_deserializer
        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                await enforce(context, method)
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, de, ser)

        def streaming(inner: Callable[[Any, Any], Any]) -> Callable[[Any, Any], AsyncIterator[Any]]:
            async def wrapped(request: Any, context: Any) -> AsyncIterator[Any]:
                await enforce(context, method)
                result = inner(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif result is not None:
                    await result

            return wrapped

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), de, ser)
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator: Any, context: Any) -> Any:
                await enforce(context, method)
                return await inner_su(request_iterator, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, de, ser)
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), de, ser)


def channel_credentials(
    ca: bytes, cert: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    """Client side (probes, tests): trust `ca`, present `cert`/`key`."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
