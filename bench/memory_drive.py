"""Memory of an extauthz server after N distinct checks: the server's own objects, in-process.

Builds the app exactly as `extauthz serve` does (`load_settings` from the same config file,
the same observers, `build_app`, a loaded policy), then sends `--checks` CheckRequests through
`app.servicer.Check`, each parsed from its own serialized bytes like grpc does, each with a
distinct path and a principal cycling over `--principals` distinct SPIFFE IDs. Prints one
JSON line per checkpoint with this process's RSS (`/proc/self/status`), then a summary line.

Why in-process: a Python gRPC client drives a Python gRPC server at ~2-4k checks/s on two
cores, so a million distinct checks through the network would take minutes; what grows with
distinct keys lives in the servicer (decision cache, limiter state, identity caches), not in
gRPC, whose buffers depend on concurrency. The benchmark also measures a real server over
gRPC for a shorter run and reports both, so the two can be compared.

    python bench/memory_drive.py --policy DIR --checks 1000000 --principals 100000
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import make_request
from envoy.service.auth.v3 import external_auth_pb2 as ea
from microbench import observers_for, run_to_completion

from extauthz.app import build_app
from extauthz.settings import load_settings
from extauthz.transport.grpc_server import GrpcTransport


def rss_mib() -> tuple[float, float]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def principal(i: int, principals: int) -> str:
    return f"spiffe://prod.example/ns/shop/sa/wl-{i % principals:06d}"


def path(i: int) -> str:
    return f"/v1/stock/sku-{i:07d}?w=eu"


def template() -> ea.CheckRequest:
    """The memory runs' request: GET inventory.mesh.local/v1/stock/..., allowed for every
    `spiffe://prod.example/ns/shop/sa/*` (rule stock-read); no certificate."""
    return make_request.check_request(host="inventory.mesh.local", path="/v1/stock")


def wire(base: bytes, i: int, principals: int) -> bytes:
    """Check number `i` as serialized bytes. A new message each time: upb keeps every string
    ever assigned to a message in its arena until the message dies, so reusing one template
    and overwriting its fields would grow this process, not the server."""
    msg = ea.CheckRequest.FromString(base)
    http = msg.attributes.request.http
    http.path = path(i)
    http.headers[":path"] = http.path
    msg.attributes.source.principal = principal(i, principals)
    return msg.SerializeToString()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.add_argument("--checks", type=int, default=1_000_000)
    p.add_argument("--principals", type=int, default=100_000)
    p.add_argument("--points", default="0.1,0.25,0.5,0.75,1.0")
    args = p.parse_args()
    settings = load_settings({"policy": str(args.policy)}, {}, args.config)
    app = build_app(settings, observers=observers_for(settings))
    if not app.store.reload():
        raise SystemExit(f"policy did not load: {app.store.last_error}")
    gc.collect()
    start_rss = rss_mib()[0]
    print(json.dumps({"checks": 0, "rss_mib": round(start_rss, 1), "seconds": 0.0}), flush=True)
    marks = sorted({int(args.checks * float(f)) for f in args.points.split(",")})
    base = template().SerializeToString()
    check = GrpcTransport(app).servicer.Check
    allowed = 0
    t0 = time.perf_counter()
    for i in range(args.checks):
        request = ea.CheckRequest.FromString(wire(base, i, args.principals))
        response = run_to_completion(check(request, None))
        allowed += response.status.code == 0
        if marks and i + 1 == marks[0]:
            marks.pop(0)
            print(json.dumps({"checks": i + 1, "rss_mib": round(rss_mib()[0], 1),
                              "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    elapsed = time.perf_counter() - t0
    rss, hwm = rss_mib()
    summary = {
        "done": args.checks,
        "allowed": allowed,
        "seconds": round(elapsed, 1),
        "rss_mib": round(rss, 1),
        "peak_mib": round(hwm, 1),
        "cache_entries": app.cache.size,
        "cache_size": app.cache.maxsize,
        "limiter_max_keys": settings.limiter_max_keys,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
