"""The pure core must not import gRPC, OpenTelemetry's SDK, Redis or Envoy's protos."""

import ast
from pathlib import Path

CORE = ["model", "identity/spiffe", "identity/xfcc", "identity/jwt", "identity/resolver",
        "policy/document", "policy/paths", "policy/compiled", "policy/conditions",
        "policy/connections", "policy/principals", "tools/explain", "tools/review/__init__",
        "tools/review/attribution", "tools/review/findings", "tools/review/patch",
        "tools/review/results", "tools/review/reviewer", "tools/review/shapes",
        "tools/review/tally", "tools/inventory", "decide/cache", "decide/ratelimit", "decide/pipeline"]
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "opentelemetry.sdk", "redis", "envoy",
             "xds", "urllib", "http", "socket", "asyncio.subprocess", "subprocess")

PKG = Path(__file__).resolve().parents[2] / "extauthz"


def test_core_modules_import_nothing_from_the_edges() -> None:
    offenders = []
    for name in CORE:
        path = PKG / f"{name}.py"
        assert path.exists(), f"core module {name}.py was renamed: update CORE"
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for mod in mods:
                if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN):
                    offenders.append(f"{name}.py imports {mod}")
    assert offenders == []
