"""The pure core reaches no edge: no network, no process, no file I/O, no gRPC/OTel SDK/Redis,
no Envoy protos, and no extauthz module outside the core — followed transitively.

Every module under identity/, policy/ and decide/, plus model.py and the two leaf modules
they share (headers.py, memo.py), is parsed; every import in it (including ones inside
functions, which is how an edge import hides) is collected, and imports of extauthz modules
are followed to their own imports, so a core module cannot reach the edge through a helper.
Third-party libraries are not followed (PyJWT, cachetools, re2, yaml, cel are pure for our use).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "extauthz"
CORE_PACKAGES = ("identity", "policy", "decide")
CORE_MODULES = ("model", "headers", "memo")
FORBIDDEN = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "opentelemetry.sdk",
             "redis", "urllib", "http", "socket", "ssl", "subprocess", "asyncio.subprocess",
             "envoy", "xds", "udpa", "validate", "envoy_data_plane", "betterproto2",
             "prometheus_client", "requests", "httpx")
# Pure string functions inside a forbidden package: `urllib.parse.unquote` decodes the
# certificate Envoy URL-encodes (identity/x509svid.py); it opens no connection. `urllib` itself
# and `urllib.request` (what the JWKS fetcher uses) stay forbidden.
ALLOWED = ("urllib.parse",)
FILE_IO_CALLS = frozenset({"open", "read_text", "read_bytes", "write_text", "write_bytes",
                           "write", "writelines", "unlink", "mkdir", "touch"})


def core_modules() -> list[str]:
    found = [f"extauthz.{m}" for m in CORE_MODULES]
    for package in CORE_PACKAGES:
        for path in sorted((PKG / package).glob("*.py")):
            name = path.stem
            found.append(f"extauthz.{package}" if name == "__init__" else f"extauthz.{package}.{name}")
    return found


def is_core(module: str) -> bool:
    parts = module.split(".")
    if parts[0] != "extauthz":
        return True  # not ours: judged by FORBIDDEN only
    if len(parts) == 1:
        return True  # the package itself (__init__: version only)
    return parts[1] in CORE_PACKAGES or (len(parts) == 2 and parts[1] in CORE_MODULES)


def source_of(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "extauthz":
        return None
    if len(parts) == 1:
        return PKG / "__init__.py"
    rel = Path(*parts[1:])
    for candidate in (PKG / rel.with_suffix(".py"), PKG / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(module: str, tree: ast.AST) -> list[str]:
    out = []
    path = source_of(module)
    package = module if path is not None and path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append(base)
            # `from extauthz import headers` imports a module, not a name
            out += [f"{base}.{a.name}" for a in node.names if source_of(f"{base}.{a.name}")
                    and base.startswith("extauthz")]
    return out


def file_io_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                func.attr if isinstance(func, ast.Attribute) else "")
            if name in FILE_IO_CALLS:
                found.append(f"line {node.lineno}: {name}()")
    return found


def walk_core(roots: list[str] | None = None, *, core_only: bool = True,
              ) -> tuple[list[str], list[str]]:
    """(offending imports with the path that reached them, file I/O calls)."""
    offenders: list[str] = []
    io: list[str] = []
    seen: set[str] = set()
    stack = [(m, m) for m in (roots if roots is not None else core_modules())]
    while stack:
        module, via = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        path = source_of(module)
        if path is None:
            continue
        tree = ast.parse(path.read_text())
        io += [f"{module}: {call}" for call in file_io_calls(tree)]
        for imported in imports_of(module, tree):
            chain = f"{via} -> {imported}"
            if imported in ALLOWED:
                continue
            if any(imported == f or imported.startswith(f + ".") for f in FORBIDDEN):
                offenders.append(chain)
            elif imported.startswith("extauthz"):
                if core_only and not is_core(imported):
                    offenders.append(chain)
                else:
                    stack.append((imported, chain))
    return offenders, io


def test_core_reaches_no_edge_transitively() -> None:
    offenders, _ = walk_core()
    assert offenders == []


def test_core_does_no_file_io() -> None:
    _, io = walk_core()
    assert io == []


def test_the_walk_sees_every_core_module_and_follows_imports_inside_functions() -> None:
    """The guard itself: it must find an edge import hidden in a function of a helper."""
    assert len(core_modules()) >= 20
    tree = ast.parse("def f():\n    from extauthz.sources.jwks import KeySets\n    open('x')\n")
    assert imports_of("extauthz.identity.resolver", tree) == ["extauthz.sources.jwks"]
    relative = ast.parse("from . import jwt\nfrom ..model import Identity\n")
    assert imports_of("extauthz.identity.resolver", relative) == [
        "extauthz.identity", "extauthz.identity.jwt", "extauthz.model"]
    assert file_io_calls(tree) == ["line 3: open()"]
    assert not is_core("extauthz.sources.jwks") and not is_core("extauthz.app")
    assert is_core("extauthz.policy.compiled") and is_core("extauthz.headers")


def test_offline_tools_reach_no_network_grpc_or_envoy_protos() -> None:
    """`explain`, `review` and `inventory` read files, but run without a server: they must not
    pull in gRPC, the OTel SDK, Redis or the network either."""
    roots = ["extauthz.tools.explain", "extauthz.tools.inventory", "extauthz.tools.policy_tests",
             "extauthz.tools.lint"]
    roots += [f"extauthz.tools.review.{p.stem}" for p in (PKG / "tools" / "review").glob("*.py")]
    assert all(source_of(r) is not None for r in roots), "a tool was renamed: update roots"
    offenders, _ = walk_core(roots, core_only=False)
    assert offenders == []


def test_the_core_has_no_import_cycle() -> None:
    """Imports go one way (the old policy -> network_policy -> principals -> policy circle is
    what made connection rules re-implement the parser); type-only imports count too."""
    graph: dict[str, set[str]] = {}
    for module in core_modules():
        path = source_of(module)
        assert path is not None
        tree = ast.parse(path.read_text())
        graph[module] = {m for m in imports_of(module, tree)
                         if m.startswith("extauthz.") and m != module and source_of(m)}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
