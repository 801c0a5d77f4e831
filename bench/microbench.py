"""Where a check's time goes: each stage of extauthz's hot path, timed in-process.

The same CheckRequest as the direct benchmark goes through the real objects `build_app` makes
(no gRPC, no event-loop wake-ups), stage by stage, best of 5 rounds. The stages overlap on
purpose: `servicer.Check` contains `to_request`, `Authorizer.check` and `_respond`.

    python bench/microbench.py POLICY_DIR
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import make_request
from envoy.service.auth.v3 import external_auth_pb2 as ea
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extauthz.app import build_app
from extauthz.decide.guards import normalize_host
from extauthz.observe.decision_log import fast_line
from extauthz.observe.tracing import SpanRecorder
from extauthz.observe.wiring import build_observers
from extauthz.settings import Settings
from extauthz.transport.grpc_proto import ResponseOptions, to_request, to_response
from extauthz.transport.grpc_server import GrpcTransport

try:
    from extauthz.policy.paths import normalize_path
except ImportError:  # pragma: no cover - moved
    normalize_path = None  # type: ignore[assignment]


def _settings(policy: Path, cache_size: int) -> Settings:
    extra: dict[str, Any] = {}
    fields = Settings.__dataclass_fields__
    if "tracing" in fields:
        extra["tracing"] = False
    if "decision_log" in fields:
        extra["decision_log"] = "none"
    return Settings(policy=policy, cache_size=cache_size, **extra)


def _best(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    """Microseconds per call, best of `rounds`; NaN when the stage cannot be called (the
    private functions timed here change with the server, and a stale stage must not stop
    the benchmark)."""
    try:
        fn()
    except Exception:
        return float("nan")
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def run_to_completion(coro: Any) -> Any:
    """Run a coroutine that never suspends (the hot path does not) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("the coroutine suspended")


def _best_async(coro_fn: Callable[[], Any], n: int) -> float:
    return _best(lambda: run_to_completion(coro_fn()), n)


def observers_for(settings: Settings) -> tuple[Any, ...]:
    """What `extauthz serve` installs for these settings."""
    return tuple(build_observers(settings).observers)


def run(policy: Path, cert_pem: bytes | None, n: int = 3000) -> list[dict[str, Any]]:
    hit_settings = _settings(policy, 100_000)
    observers = observers_for(hit_settings)
    hit_app = build_app(hit_settings, observers=observers)
    bare_app = build_app(hit_settings)
    miss_app = build_app(_settings(policy, 0), observers=observers_for(_settings(policy, 0)))
    if not hit_app.store.reload():
        raise RuntimeError(f"policy did not load: {hit_app.store.last_error}")
    for app in (bare_app, miss_app):  # one load (seconds for 10,000 rules), shared
        app.store.current = hit_app.store.current
    message = make_request.check_request(cert_pem=cert_pem)
    body = message.SerializeToString()
    authorizer = hit_app.authorizer
    identity = getattr(authorizer, "identity", None) or authorizer._identity
    request = to_request(message)
    now = time.time()
    compiled = hit_app.store.current
    assert compiled is not None
    host = normalize_host(request.host) or ""
    path = normalize_path(request.path) if normalize_path else request.path
    found = identity.resolve(request, now)
    servicer = GrpcTransport(hit_app).servicer
    bare_servicer = GrpcTransport(bare_app).servicer
    miss_servicer = GrpcTransport(miss_app).servicer
    # Warm the caches (decision, certificate facts, response memo).
    first = run_to_completion(servicer.Check(message, None))
    assert first.status.code == 0, first
    result = run_to_completion(authorizer.check(request))
    evaluated = compiled.evaluate(found, host, request.method, path or "/").decision
    options = ResponseOptions()
    key = (found.principal, found.source, found.issuer, request.method, host, path,
           compiled.version)

    rows: list[tuple[str, str, float]] = [
        ("floor", "CheckRequest parse (upb)", _best(lambda: ea.CheckRequest.FromString(body), n)),
        ("hit", "proto.to_request", _best(lambda: to_request(message), n)),
        ("hit", "IdentityResolver.resolve (mTLS + cert cache)",
         _best(lambda: identity.resolve(request, now), n)),
        ("hit", "normalize_host + normalize_path",
         _best(lambda: (normalize_host(request.host),
                        normalize_path(request.path) if normalize_path else None), n)),
        ("hit", "DecisionCache.get (hit)", _best(lambda: hit_app.cache.get(key), n)),
        ("hit", "servicer._respond (memoized)", _best(lambda: servicer._respond(result), n)),
        ("miss", "CompiledPolicy.limits (no limit applies; a hit reads its cache entry)",
         _best(lambda: compiled.limits(result.decision), n)),
        ("hit", "Authorizer.check (cache hit)", _best_async(lambda: authorizer.check(request), n)),
        ("hit", "observers (tracing off, decision log none, no metrics)",
         _best(lambda: [o.observe(request, result, 1e-5) for o in observers], n)),
        ("hit", "servicer.Check, whole (cache hit)",
         _best_async(lambda: servicer.Check(message, None), n)),
        ("hit", "servicer.Check, whole (cache hit), no observers installed",
         _best_async(lambda: bare_servicer.Check(message, None), n)),
        ("miss", f"CompiledPolicy.evaluate ({len(compiled.rules):,} rules)",
         _best(lambda: compiled.evaluate(found, host, request.method, path or "/"), n)),
        ("miss", "proto.to_response (allow)", _best(lambda: to_response(evaluated, options), n)),
        ("miss", "proto.to_response + SerializeToString",
         _best(lambda: to_response(evaluated, options).SerializeToString(), n)),
        ("miss", "servicer.Check, whole (cache disabled)",
         _best_async(lambda: miss_servicer.Check(message, None), n)),
    ]
    rows += _observability_rows(request, result, n)
    return [{"path": p, "stage": s, "us": round(us, 2)} for p, s, us in rows]


def _observability_rows(request: Any, result: Any, n: int) -> list[tuple[str, str, float]]:
    """What a sampled span and a decision-log line cost: the tracing row's extra work."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    recorder = SpanRecorder(provider.get_tracer("bench"), roots=True)
    span_us = _best(lambda: recorder.record(request, result, 1e-4), n)
    spans = memory.get_finished_spans()[:512]
    rounds = max(1, n // len(spans))
    encode_us = _best(lambda: encode_spans(spans).SerializeToString(), rounds) / len(spans)
    item = (time.time(), request, result, 1e-4, "0af7651916cd43dd8448eb211c80319c",
            "b7ad6b7169203331")
    line_us = _best(lambda: fast_line(item), n)
    return [
        ("obs", "span: create, 15 attributes, end (OTel SDK, sampled)", span_us),
        ("obs", "span: OTLP protobuf encoding, per span (exporter thread)", encode_us),
        ("obs", "decision-log line formatting (writer thread)", line_us),
    ]


if __name__ == "__main__":
    import tempfile

    import policies

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "policy"
    if not target.exists():
        policies.generate(target)
    from extauthz.devstack.certs import CertificateAuthority

    svid = CertificateAuthority.create("prod.example").issue_svid(make_request.PRINCIPAL)
    for row in run(target, svid.cert_pem):
        print(f"{row['path']:5} {row['us']:8.2f} µs  {row['stage']}")
