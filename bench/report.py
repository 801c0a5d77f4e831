# ruff: noqa: RUF001  (the report prints the multiplication sign and dashes on purpose)
"""Turn a benchmark run's results into docs/benchmarks.md, a console summary and a PNG chart.

    python bench/report.py RESULTS.json        # re-render docs/benchmarks.{md,png} from a run
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

TARGETS = {  # kind -> (limit on CPU/check as a multiple of the floor's, description)
    "hit": (1.15, "cache hit CPU/check ≤ 1.15× floor"),
    "miss": (1.30, "cache miss on 10k rules CPU/check ≤ 1.3× floor"),
    "obs": (1.50, "tracing 100% + decision log CPU/check ≤ 1.5× floor"),
}
ENVOY_RPS_TARGET = 0.9
ADDED_P99_TARGET_MS = 1.0
NOISY_LOAD = 0.5


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r.get("kind") or r.get("variant"): r for r in rows}


def verdicts(res: dict[str, Any]) -> list[dict[str, str]]:
    """One line per target: what was measured, against what, met or not."""
    out: list[dict[str, str]] = []
    direct = _by_kind(res.get("direct", []))
    floor = direct.get("floor")
    for kind, (limit, text) in TARGETS.items():
        row = direct.get(kind)
        if floor is None or row is None:
            continue
        if row.get("na"):
            out.append({"target": text, "measured": f"n/a ({row['na']})", "verdict": "n/a"})
            continue
        ratio = row["cpu_us_per_check"] / floor["cpu_us_per_check"]
        out.append({
            "target": text,
            "measured": f"{ratio:.2f}× ({row['cpu_us_per_check']:.0f} vs "
                        f"{floor['cpu_us_per_check']:.0f} µs/check)",
            "verdict": "met" if ratio <= limit else "not met",
        })
    jwt = direct.get("jwt")
    if floor is not None and jwt is not None:
        if jwt.get("na"):
            measured = f"n/a ({jwt['na']})"
        else:
            ratio = jwt["cpu_us_per_check"] / floor["cpu_us_per_check"]
            measured = f"{ratio:.2f}× ({jwt['cpu_us_per_check']:.0f} µs/check)"
        out.append({"target": "JWT caller CPU/check (no target; reported)", "measured": measured,
                    "verdict": "info" if not jwt.get("na") else "n/a"})
    envoy = _by_kind(res.get("envoy", []))
    if "floor" in envoy and "extauthz" in envoy:
        ratio = envoy["extauthz"]["rps"] / envoy["floor"]["rps"]
        out.append({
            "target": f"through Envoy: extauthz ≥ {ENVOY_RPS_TARGET}× the floor's requests/s",
            "measured": f"{ratio:.2f}× ({envoy['extauthz']['rps']:,.0f} vs "
                        f"{envoy['floor']['rps']:,.0f} req/s)",
            "verdict": "met" if ratio >= ENVOY_RPS_TARGET else "not met",
        })
    rate = _by_kind(res.get("rate", []))
    if "none" in rate and "extauthz" in rate:
        added = rate["extauthz"]["p99_ms"] - rate["none"]["p99_ms"]
        out.append({
            "target": f"added p99 at {rate['none']['target_rps']:,} req/s < "
                      f"{ADDED_P99_TARGET_MS:g} ms",
            "measured": f"{added:+.2f} ms (p99 {rate['extauthz']['p99_ms']:.2f} vs "
                        f"{rate['none']['p99_ms']:.2f} ms without auth)",
            "verdict": "met" if added < ADDED_P99_TARGET_MS else "not met",
        })
    mem = res.get("memory") or {}
    points = mem.get("points") or []
    if len(points) >= 3:
        half = next((p for p in points if p["checks"] >= mem["checks"] // 2), points[-2])
        growth = points[-1]["rss_mib"] - half["rss_mib"]
        bounded = growth <= max(0.05 * points[-1]["rss_mib"], 8.0)
        out.append({
            "target": "memory bounded by configuration",
            "measured": f"RSS {points[0]['rss_mib']:.0f} → {half['rss_mib']:.0f} MiB at "
                        f"{half['checks']:,} → {points[-1]['rss_mib']:.0f} MiB at "
                        f"{points[-1]['checks']:,} checks (cache {mem['cache_size']:,} entries)",
            "verdict": "met" if bounded else "not met",
        })
    return out


def _direct_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = res.get("direct", [])
    floor = _by_kind(rows).get("floor")
    out = []
    for r in rows:
        if r.get("na"):
            out.append([r["name"], "n/a", "n/a", "–", r["na"]])
            continue
        ratio = r["cpu_us_per_check"] / floor["cpu_us_per_check"] if floor else None
        target = TARGETS.get(r.get("kind", ""), (None, ""))[0]
        out.append([
            r["name"],
            _f(r["checks_per_s"]),
            _f(r["cpu_us_per_check"], 1),
            _f(ratio, 2, "×"),
            f"≤ {target}×" if target else "",
        ])
    return out


def _envoy_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = res.get("envoy", [])
    floor = _by_kind(rows).get("floor")
    out = []
    for r in rows:
        ratio = r["rps"] / floor["rps"] if floor else None
        out.append([
            r["name"], _f(r["rps"]), _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), _f(ratio, 2, "×"),
            _f(r.get("authz_cpu_us_per_request"), 1), str(r.get("non_2xx", 0)),
        ])
    return out


def _rate_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = res.get("rate", [])
    base = _by_kind(rows).get("none")
    out = []
    for r in rows:
        added = r["p99_ms"] - base["p99_ms"] if base else None
        out.append([
            r["name"], _f(r["achieved_rps"]), _f(r["p50_ms"], 2), _f(r["p99_ms"], 2),
            _f(r["p999_ms"], 2), _f(added, 2) if r.get("variant") != "none" else "–",
            str(r.get("non_200", 0)),
        ])
    return out


def console(res: dict[str, Any]) -> str:
    parts = ["", "== direct gRPC (h2load) =="]
    parts.append(_table(["row", "checks/s", "server CPU µs/check", "× floor", "target"],
                        _direct_rows(res)))
    parts += ["", "== through Envoy (wrk) =="]
    parts.append(_table(["row", "req/s", "p50 ms", "p99 ms", "× floor", "authz µs/req", "non-2xx"],
                        _envoy_rows(res)))
    parts += ["", "== fixed rate (h2load --rps) =="]
    parts.append(_table(["row", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms",
                         "non-200"], _rate_rows(res)))
    mem = res.get("memory") or {}
    if mem:
        parts += ["", "== memory ==", _memory_text(mem)]
    if res.get("transports"):
        parts += ["", "== transports ==", transports_text(res)]
    parts += ["", "== targets =="]
    for v in verdicts(res):
        parts.append(f"- {v['target']}: {v['measured']} -> {v['verdict'].upper()}")
    return "\n".join(parts)


def _memory_text(mem: dict[str, Any]) -> str:
    grpc = mem.get("grpc") or {}
    over_grpc = {p["checks"]: p["rss_mib"] for p in grpc.get("points", [])}
    checks = sorted({p["checks"] for p in mem.get("points", [])} | set(over_grpc))
    inproc = {p["checks"]: p["rss_mib"] for p in mem.get("points", [])}
    rows = [[_f(n), _f(inproc.get(n), 1), _f(over_grpc.get(n), 1)] for n in checks]
    table = _table(["distinct checks", "RSS MiB, servicer in-process (memory_drive.py)",
                    "RSS MiB, real server over gRPC"], rows)
    entries = mem.get("cache_entries")
    text = (
        f"{table}\n\nIn-process: peak RSS (VmHWM) {mem['peak_mib']:.1f} MiB; decision cache "
        f"`cache_size: {mem['cache_size']:,}` "
        + (f"(holding {entries:,} entries at the end); " if entries is not None else "; ")
        + f"{mem['checks']:,} checks in {mem['seconds']:.0f} s ({mem['checks_per_s']:,}/s)."
    )
    pts = mem.get("points", [])
    full = next((p for p in pts if p["checks"] >= mem["cache_size"]), pts[-1] if pts else None)
    if pts and full is not None and full["checks"]:
        per = (full["rss_mib"] - pts[0]["rss_mib"]) * 1024 / min(full["checks"], mem["cache_size"])
        text += f" That is ≈ {per:.2f} KiB of RSS per cached decision."
    if grpc:
        text += (
            f" Over gRPC: {grpc['checks']:,} checks in {grpc['seconds']:.0f} s "
            f"({grpc['checks_per_s']:,}/s, 64 in flight)"
            + (f", {grpc['cache_entries']:,} cache entries (from `/metrics`)."
               if grpc.get("cache_entries") is not None else ".")
        )
    return text


def _profile_text(profile: dict[str, Any]) -> str:
    if not profile:
        return "_Not run._"
    if profile.get("na"):
        return f"_n/a: {profile['na']}_"
    buckets = _table(["% of samples", "where (innermost matching frame)"],
                     [[_f(pct, 1), name] for name, pct in profile.get("buckets", [])])
    own = _table(["% of samples (self)", "function"],
                 [[_f(pct, 1), f"`{name}`"] for name, pct in profile["self"]])
    incl = _table(["% of samples (inclusive)", "function"],
                  [[_f(pct, 1), f"`{name}`"] for name, pct in profile["inclusive"]])
    svg = f"Flame graph: [`{profile['svg']}`]({Path(profile['svg']).name}). " if profile.get(
        "svg") else ""
    return (
        f"{svg}{profile['samples']:,} samples.\n\n"
        f"Split between extauthz's own code and the gRPC machinery:\n\n{buckets}\n\n"
        f"Top frames by own time:\n\n{own}\n\n"
        f"Top Python frames including callees:\n\n{incl}"
    )


# Why a target is missed, when it is: causes found with the profile (section 5) and the
# in-process stage timings (bench/microbench.py). Keyed by the start of the target's text.
GAPS = {
    "cache hit": (
        "extauthz's own Python work on a cache hit is about 13 µs per check in-process (table "
        "in section 5), under 5% of the floor's cost. The rest of the difference is grpc.aio's "
        "per-RPC machinery, which grows with the handler's time (more event-loop wake-ups and "
        "eventfd writes per check at a lower batching rate: the profile's \"grpc.aio, protobuf, "
        "event loop\" share). The ratio sits at the target within run-to-run noise (±3%)."
    ),
    "tracing 100%": (
        "A sampled span costs the OpenTelemetry Python SDK about 35-45 µs to create, fill and end, "
        "and its OTLP protobuf encoding about 55-65 µs more in the exporter thread (both pure "
        "Python; section 5, `obs` rows); the decision-log line adds about 7 µs in its writer "
        "thread. That is ~120 µs per check, more than the whole 1.5× budget (~0.5 × the floor) "
        "by itself. extauthz samples only what the mesh samples (ParentBased), so at a typical "
        "1-10% mesh sampling rate the cost is 1-10% of this. Not fixed: a native span "
        "encoder, or exporting from a separate process."
    ),
    "through Envoy": (
        "This row moves between runs on this shared 2-core box (0.99× and 0.87× in the last two "
        "runs, whose hot paths differed only by a host-name memo): nothing is pinned, and "
        "Envoy, wrk and the server compete for two cores. Through Envoy, extauthz spends "
        "~70 µs more CPU per request than the floor "
        "(the `authz µs/req` column), more than the ~13-17 µs its Python pipeline costs "
        "in-process; the rest is grpc.aio's per-RPC overhead on Envoy's single HTTP/2 "
        "connection, which grows with the handler's time. Not reduced further."
    ),
    "added p99": (
        "The trivial ext_authz floor (a constant OK) adds more p99 latency than extauthz does "
        "(section 3): on this 2-core machine three Envoys, the load generator and the server "
        "share two cores, so the extra hop's p99 is scheduling delay, not authorization work "
        "(extauthz's in-process cost is ~13 µs). The target is below what a Python gRPC hop "
        "achieves here; on hosts with spare cores, `--workers N` and pinning Envoy apart bring "
        "it down."
    ),
}


def _gaps(verdict_rows: list[dict[str, str]]) -> list[str]:
    missed = [
        (row["target"], text)
        for row in verdict_rows
        if row["verdict"] == "not met"
        for start, text in GAPS.items()
        if row["target"].startswith(start)
    ]
    if not missed:
        return []
    out = ["### Gaps and their causes", ""]
    for target, text in missed:
        out += [f"- **{target}**: {text}", ""]
    return out


def _micro_text(micro: list[dict[str, Any]]) -> str:
    if not micro:
        return "_Not run._"
    return _table(["path", "stage", "µs"],
                  [[m["path"], m["stage"], _f(m["us"], 2)] for m in micro])


def transport_verdicts(res: dict[str, Any]) -> list[dict[str, str]]:
    """Issue 15's targets, from the `transports` section."""
    t = res.get("transports") or {}
    loaded = {r["variant"]: r for r in t.get("loaded", [])}
    unloaded = {r["variant"]: r for r in t.get("unloaded", [])}
    out: list[dict[str, str]] = []

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = loaded.get(a, {}).get(key), loaded.get(b, {}).get(key)
        return x / y if x and y else None

    def add(target: str, value: float | None, ok: bool | None, fmt: str) -> None:
        measured = "not measured" if value is None else fmt.format(value)
        verdict = "not run" if ok is None else ("met" if ok else "NOT met")
        out.append({"target": target, "measured": measured, "verdict": verdict})

    r = ratio("http-extauthz", "http-floor", "rps")
    add("HTTP extauthz (defaults) ≥ 0.85× HTTP floor req/s", r, None if r is None else r >= 0.85,
        "{:.2f}×")
    r = ratio("http-extauthz", "http-floor", "authz_cpu_us")
    add("HTTP extauthz authz CPU/check ≤ 3× HTTP floor's", r, None if r is None else r <= 3.0,
        "{:.2f}×")
    r = ratio("grpc-extauthz", "grpc-floor", "rps")
    add("gRPC extauthz (defaults) ≥ 0.9× gRPC floor req/s", r, None if r is None else r >= 0.9,
        "{:.2f}×")
    h = unloaded.get("http-extauthz", {}).get("added_p50_ms")
    g = unloaded.get("grpc-extauthz", {}).get("added_p50_ms")
    r = h / g if h is not None and g else None
    add("unloaded added latency (p50), HTTP ≤ 0.5× gRPC", r, None if r is None else r <= 0.5,
        "{:.2f}×")
    for row in t.get("workers", []):
        low = min(row["shares"]) if row.get("shares") else None
        add(f"--workers 2 behind --concurrency 2, {row['variant']}: each ≥ 30%", low,
            None if low is None else low >= 0.30, "min share {:.0%}")
    return out


def transports_text(res: dict[str, Any]) -> str:
    t = res.get("transports") or {}
    if not t:
        return "_Not run._"
    loaded = t.get("loaded", [])
    floor = {r["transport"]: r for r in loaded if r["variant"].endswith("-floor")}
    rows = []
    for r in loaded:
        base = floor.get(r.get("transport", ""), {})
        x = r["rps"] / base["rps"] if base.get("rps") and r["variant"] not in ("none", "rbac") \
            else None
        rows.append([r["name"], _f(r["rps"]), _f(r.get("p50_ms"), 2), _f(r.get("p99_ms"), 2),
                     _f(x, 2, "×"), _f(r.get("authz_cpu_us")), _f(r.get("envoy_cpu_us")),
                     _f(r.get("non_2xx"))])
    parts = [
        "Through the two-sidecar mTLS mesh (wrk → client sidecar ═mTLS═▶ server sidecar → "
        "upstream), both Envoys `--concurrency 1`; the server sidecar is rendered by "
        "`extauthz envoy-config` for the row's transport. \"× floor\" compares with the "
        "do-nothing server of the same transport; CPU columns are per request.",
        "",
        _table(["row", "req/s", "p50 ms", "p99 ms", "× floor", "authz CPU µs", "server Envoy "
                "CPU µs", "non-2xx"], rows),
        "",
        "One request at a time (wrk, 1 connection): the latency each authorizer adds to the "
        "mesh without auth.",
        "",
        _table(["row", "req/s", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms"],
               [[r["name"], _f(r["rps"]), _f(r.get("p50_ms"), 3), _f(r.get("p99_ms"), 3),
                 _f(r.get("added_p50_ms"), 3), _f(r.get("added_p99_ms"), 3)]
                for r in t.get("unloaded", [])]),
        "",
        "Direct, no Envoy (wrk straight at the HTTP listener with the headers the sidecar "
        "sends): authorizer CPU per check.",
        "",
        _table(["row", "checks/s", "CPU µs/check", "non-2xx"],
               [[r["variant"], _f(r["rps"]), _f(r.get("cpu_us"), 1), _f(r.get("non_2xx"))]
                for r in t.get("direct", [])]),
        "",
        "`extauthz serve --workers 2` behind a server sidecar with `--concurrency 2` (the "
        "client sidecar opens one mTLS connection per wrk connection, so both server workers "
        "are busy): the share of checks each extauthz worker decided (its "
        "`extauthz_checks_total`).",
        "",
        _table(["transport", "authz cluster", "req/s", "worker shares"],
               [[r["transport"], (f"max_concurrent_streams {r['max_concurrent_streams']}"
                                   if r.get("max_concurrent_streams") else "defaults"),
                 _f(r["rps"]), " / ".join(f"{s:.0%}" for s in r.get("shares", []))]
                for r in t.get("workers", [])]),
        "",
        "**Which transport when.** Beside the sidecar (loopback or a unix socket) for HTTP "
        "services, choose **HTTP** (`extauthz serve --http-listen`, `extauthz envoy-config "
        "--transport http`): the same decisions at a fraction of the CPU per check on both "
        "sides of the hop and more requests/s through the mesh. Choose **gRPC** for TCP "
        "services (Envoy's network ext_authz speaks only gRPC), when policies need the route "
        "name, metadata namespaces or the body, or when one extauthz serves several Envoys "
        "over the network. docs/operations.md explains how to wire each.",
        "",
        _table(["target (issue 15)", "measured", "verdict"],
               [[x["target"], x["measured"], f"**{x['verdict']}**"]
                for x in transport_verdicts(res)]),
        "",
        '**Why the unmet targets are unmet.** Compare the `--decision-log none` rows with '
        'the defaults: the default decision log (one JSON line per check, formatted in a '
        'Python writer thread that contends for the GIL) is most of the gap on both '
        'transports (see the x-floor column of the rows without it). The rest of the HTTP '
        'CPU target is the Python decision itself: a do-nothing server spends ~4 us per '
        "check, extauthz's identity, cache lookup, guards and answer ~20 us "
        '(`bench/microbench.py`, section 5), so 3x of a do-nothing floor is below what a '
        'Python decision costs. Operators who need the headroom sample allowed decisions '
        '(`--decision-log-sample-allowed`) or turn the log off.',
        "",
        "Authorizer commands:",
        "",
        "```sh",
        *[f"# {k}\n{c}" for k, c in (t.get("commands") or {}).items()],
        "```",
    ]
    return "\n".join(parts)


def render(res: dict[str, Any]) -> str:
    m = res.get("machine", {})
    o = res.get("options", {})
    load = m.get("load_at_start", [0])[0]
    noisy = load > NOISY_LOAD or m.get("load_at_end", [0])[0] > NOISY_LOAD + 1.5
    cmds = res.get("commands", {})
    v = verdicts(res)
    lines = [
        "# Benchmarks",
        "",
        "_Generated by `make bench` (`bench/run.py`) on "
        f"{res.get('started', '?')} in {res.get('seconds', 0):.0f} s. Do not edit: rerun it._",
        "",
        "Rate-limit backends (in-memory vs one Redis vs Redis Cluster): "
        "[rate-limits.md, Benchmark](rate-limits.md#benchmark) (`bench/redis_limits.py`).",
        "",
    ]
    if noisy:
        lines += [
            f"> **Noisy run.** The load average was {load} when it started (other work was "
            "running on this 2-core machine), so absolute numbers are low and ratios are "
            "rough. Rerun `make bench` on a quiet machine (`uptime` load < 0.5) for numbers "
            "worth quoting.",
            "",
        ]
    lines += [
        "## Targets",
        "",
        _table(["target", "measured", "verdict"],
               [[x["target"], x["measured"], f"**{x['verdict']}**"] for x in v]),
        "",
        *_gaps(v),
        "## Machine and settings",
        "",
        f"- CPU: {m.get('cpu')} × {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
        f"Linux {m.get('kernel')}; load average {m.get('load_at_start')} at start, "
        f"{m.get('load_at_end')} at end",
        f"- Python {m.get('python')}, grpcio {m.get('grpcio')}, uvloop {m.get('uvloop')}, "
        f"Envoy {m.get('envoy')}, h2load {m.get('h2load')}, wrk {m.get('wrk')}",
        f"- Each row: {o.get('warmup'):g} s warm-up, then {o.get('duration'):g} s measured. "
        f"Direct rows: h2load 1 thread, {o.get('clients')} connections × {o.get('streams')} "
        "concurrent streams"
        + (", server pinned to CPU 0 and h2load to CPU 1 (`taskset`)." if o.get("pin")
           else ", nothing pinned.")
        + f" Envoy rows: wrk 1 thread, {o.get('wrk_connections')} connections; nothing pinned.",
        f"- Policy: {o.get('rules'):,} rules generated by `bench/policies.py` (the README's "
        "orders/inventory services plus 100 generated services; ~1,000 rules on the benchmark "
        "request's host; exact paths, segment prefixes, SPIFFE IDs and patterns, deny rules, a "
        "dry-run rule, rate limits).",
        "",
        "## 1. Direct gRPC: the server alone",
        "",
        "h2load sends one realistic CheckRequest over and over "
        f"({cmds.get('request', '').split('# ')[-1]}: an mTLS caller's SPIFFE ID and its "
        "URL-encoded certificate, host, method, a path with a query, `traceparent`, and the "
        "`x-forwarded-client-cert` the server sidecar sets). **Server CPU µs per check** is "
        "the server process's user+system CPU time (`/proc/PID/stat`, all threads) over the "
        "measured window divided by the checks completed — it is what a check costs, and unlike "
        "checks/s it hardly depends on what else the machine is doing. The floor is "
        "`bench/floor_server.py`: the same grpc.aio + uvloop server returning a constant OK. "
        "h2load only sees HTTP/2 statuses (gRPC's are in trailers), so each server is first "
        "asked once by a real gRPC client: OK, with the expected principal.",
        "",
        _table(["row", "checks/s", "server CPU µs/check", "× floor", "target"],
               _direct_rows(res)),
        "",
        "- *cache miss*: h2load repeats a single body, so the miss row disables the decision "
        "cache (`--cache-size 0`): every check resolves the identity, evaluates the 10,000-rule "
        "policy and builds a fresh response.",
        "- *JWT caller*: the mTLS peer is a gateway the policy does not allow, and the request "
        "carries `authorization: Bearer <JWT-SVID>` (ES256, JWKS from a file) for `billing`; "
        "a 200 with `billing` as principal proves the JWT decided. Token verification is cached "
        "by extauthz; the decision cache is on.",
        "- *tracing + decision log*: `tracing: true` with `OTEL_TRACES_SAMPLER=always_on` "
        "(every check a span) exported over OTLP/gRPC to `bench/otlp_sink.py` (a collector "
        "that accepts and discards), and `decision_log: FILE` (one JSON line per check).",
        "",
        "## 2. Through Envoy: a two-sidecar mTLS mesh",
        "",
        "```",
        "wrk ─HTTP/1.1─▶ client sidecar ═mTLS, HTTP/2═▶ server sidecar ─▶ upstream",
        "                (Envoy, caller's SVID)          (Envoy)           (Envoy,",
        "                                                   │ ext_authz      direct_response)",
        "                                                   ▼ gRPC",
        "                                             extauthz | floor",
        "```",
        "",
        "The principal reaches extauthz the honest way: the client sidecar originates mTLS with "
        "the caller's X.509-SVID, the server sidecar (extauthz's own bootstrap from "
        "`extauthz/envoyconf/bootstrap.py`: client certificate required, header sanitizing, "
        "fail-closed ext_authz with the peer certificate) verifies it and sends its URI SAN to "
        "extauthz. Only the server sidecar's auth filter changes between rows (`bench/envoy_mesh"
        ".py`); the native RBAC row expresses the same 10,000 rules (`bench/envoy_rbac.py`, "
        "principals matched on the peer's URI SAN). The upstream is a third Envoy answering "
        "`200 ok` by `direct_response`, so the application never limits the numbers. All "
        "Envoys run `--concurrency 1`. Before each row, an allowed path must give 200 and a "
        "forbidden one 403 (200 without auth). The CheckRequest Envoy sent the floor: "
        f"{m.get('envoy_check_request', 'not captured')}.",
        "",
        _table(["row", "req/s", "p50 ms", "p99 ms", "× floor", "authz server CPU µs/req",
                "non-2xx"], _envoy_rows(res)),
        "",
        "Everything shares the same 2 cores here (wrk, three Envoys and the authorization "
        "server), so a row's requests/s falls by whatever CPU its auth filter spends; p50/p99 "
        "are wrk's (closed loop, so they include queueing at saturation).",
        "",
        f"## 3. Latency at a fixed rate ({o.get('rate'):,} requests/s)",
        "",
        "wrk has no rate mode and wrk2 is not packaged in Debian, so this uses h2load's "
        f"`--rps` (C, open-ish loop: {o.get('rate_clients')} HTTP/1.1 connections × "
        f"{o.get('rate', 0) // max(o.get('rate_clients', 1), 1)} requests/s each) through the "
        "same mesh, with per-request latencies from `--log-file` (the first second dropped as "
        "warm-up). Added p99 = p99 with the auth filter − p99 without.",
        "",
        _table(["row", "req/s", "p50 ms", "p99 ms", "p99.9 ms", "added p99 ms", "non-200"],
               _rate_rows(res)),
        "",
        "## 4. Memory",
        "",
        f"{(res.get('memory') or {}).get('checks', 0):,} checks, each with a distinct path, "
        f"from {(res.get('memory') or {}).get('principals', 0):,} distinct principals "
        "(SPIFFE IDs under `spiffe://prod.example/ns/shop/sa/*`, allowed by `stock-read`; sent "
        "without a certificate, so that 100,000 SVIDs need not be minted — the certificate-facts "
        "cache is bounded on its own, 1,024 entries), with the same settings as the cache-hit "
        "row (default `cache_size`, `cache_ttl` 60 s). A million checks do not fit in the time "
        "budget over gRPC (a Python client and a Python server share two cores, ~2-3k "
        "checks/s), so `bench/memory_drive.py` builds the app exactly as `extauthz serve` does "
        "and feeds each request, parsed from its own bytes, to `app.servicer.Check` in a "
        "process of its own; what grows with distinct keys lives there, not in gRPC, whose "
        "buffers depend on concurrency. The first part of the same traffic also goes over "
        "gRPC into a real `extauthz serve` (64 calls in flight) to compare the two.",
        "",
        _memory_text(res["memory"]) if res.get("memory") else "_Not run._",
        "",
        "Every per-key structure is bounded by a setting: the decision cache (`cache_size`, "
        "LRU + TTL), the rate-limit state (`limiter_max_keys`), the certificate-facts cache "
        "(`identity.cert_cache_size`), verified JWTs (`identity.jwt.cache_size`) and the "
        "response memo (4,096). RSS therefore rises while the decision cache fills, then stays "
        "flat; to bound memory, size `cache_size` (about one decision per distinct "
        "principal × method × host × path seen within the TTL).",
        "",
        "## 5. Where the time goes (cache hit)",
        "",
        "py-spy sampled the cache-hit server under the same h2load load, right after its "
        "measured row (`--gil`: only the thread holding the GIL, i.e. the one working; "
        "`--native`: C frames of grpc, protobuf and uvloop included):\n\n"
        f"    {cmds.get('py-spy', 'py-spy record ...')}\n",
        _profile_text(res.get("profile") or {}),
        "",
        "The same request through each stage of the hot path in-process (`bench/microbench.py`, "
        "best of 5; no gRPC, so these are the Python costs that come on top of the floor):",
        "",
        _micro_text(res.get("micro") or []),
        "",
        "## 6. Transports: gRPC or HTTP ext_authz",
        "",
        transports_text(res),
        "",
        "## Exact commands",
        "",
        "```sh",
        *[f"# {k}\n{c}" for k, c in cmds.items()],
        "```",
        "",
    ]
    for note in res.get("notes", []):
        lines += [f"> Note: {note}", ""]
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (a, b), (c, d) = axes
    direct = [r for r in res.get("direct", []) if not r.get("na")]
    if direct:
        names = [r["name"].replace("extauthz, ", "").replace(" (", "\n(") for r in direct]
        values = [r["cpu_us_per_check"] for r in direct]
        bars = a.barh(names[::-1], values[::-1], color="#4c72b0")
        a.bar_label(bars, fmt="%.0f µs", padding=3)
        a.set_title("Direct gRPC: server CPU per check (lower is better)")
        a.set_xlabel("µs of server CPU per check")
        a.set_xlim(0, max(values) * 1.25)
        a.axvline(values[0], color="grey", linestyle=":", linewidth=1)
    envoy = res.get("envoy", [])
    if envoy:
        names = [r["name"].replace("Envoy + ", "+ ").replace("Envoy, ", "") for r in envoy]
        bars = b.barh(names[::-1], [r["rps"] for r in envoy][::-1], color="#55a868")
        b.bar_label(bars, labels=[f"{r['rps']:,.0f}/s  p99 {r['p99_ms']:.1f} ms"
                                  for r in envoy][::-1], padding=3)
        b.set_title("Through Envoy (wrk): requests/s (higher is better)")
        b.set_xlabel("requests/s")
        b.set_xlim(0, max(r["rps"] for r in envoy) * 1.8)
    rate = res.get("rate", [])
    if rate:
        names = [r["name"].replace("Envoy + ", "").replace("Envoy, ", "").replace(" → ", "\n→ ")
                 for r in rate]
        x = range(len(rate))
        width = 0.38
        c.bar([i - width / 2 for i in x], [r["p50_ms"] for r in rate], width, label="p50")
        c.bar([i + width / 2 for i in x], [r["p99_ms"] for r in rate], width, label="p99")
        c.set_xticks(list(x), names)
        c.set_ylabel("ms")
        c.set_title(f"Latency at {rate[0]['target_rps']:,} requests/s (h2load --rps)")
        c.legend()
    mem = res.get("memory") or {}
    if mem.get("points"):
        pts = mem["points"]
        d.plot([p["checks"] for p in pts], [p["rss_mib"] for p in pts], marker="o",
               label="servicer in-process")
        gpts = (mem.get("grpc") or {}).get("points") or []
        if gpts:
            d.plot([p["checks"] for p in gpts], [p["rss_mib"] for p in gpts], marker="s",
                   label="real server over gRPC")
        d.axvline(mem["cache_size"], color="grey", linestyle=":", label="cache_size")
        d.legend()
        d.set_title("extauthz RSS vs distinct checks")
        d.set_xlabel("checks (distinct paths)")
        d.set_ylabel("RSS MiB")
        d.set_ylim(0, max(p["rss_mib"] for p in pts) * 1.2)
        d.grid(alpha=0.3)
    for ax in (a, b, c, d):
        if not ax.has_data():
            ax.set_axis_off()
    m = res.get("machine", {})
    fig.suptitle(f"extauthz benchmark — {m.get('cpu')} × {m.get('cores')} cores, "
                 f"Python {m.get('python')}, Envoy {m.get('envoy')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    (REPO / "docs" / "benchmarks.md").write_text(render(data), encoding="utf-8")
    chart(data, REPO / "docs" / "benchmarks.png")
    print(console(data))
