"""What the doctor analyses: the resources of a bootstrap or of an admin `/config_dump`.

Both inputs become one `Inventory`: the listeners in effect, the clusters, the route
configurations and the ECDS filter configs by name, each with the JSONPath where it was found,
plus what the input refers to but does not contain (an ADS bootstrap names a management server;
its listeners are not in the file). The analysis never needs to know which input it reads,
and "not in the input" is recorded here instead of being mistaken for "nothing there".

A `/config_dump` (also what `istioctl proxy-config all -o json` prints) is a list of sections,
each an Any with its own `@type`; they are matched by type, never by position, and any of them
may be absent (`?mask=`, `?resource=`). Static listeners appear both in the bootstrap section
and in the listeners section: the listeners section wins. Of a dynamic listener, the active
and the warming state are analysed (what serves now and what is about to); a draining one is
on its way out; an update in `error_state` was refused by Envoy and is not in effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extauthz.tools.doctor.parsing import DoctorError, ParseNotes, api_class, parse_message

_ADMIN = "envoy.admin.v3."


@dataclass(frozen=True, slots=True)
class Resource:
    obj: Any  # the typed message
    path: str  # JSONPath in the input
    origin: str = "static"  # "static" | "dynamic" | "dynamic, warming"


@dataclass(slots=True)
class Inventory:
    source: str  # "bootstrap" | "config_dump"
    bootstrap: Any  # typed Bootstrap, or None when a dump has no bootstrap section
    bootstrap_path: str
    listeners: list[Resource] = field(default_factory=list)
    clusters: dict[str, Resource] = field(default_factory=dict)
    route_configs: dict[str, Resource] = field(default_factory=dict)  # RDS-delivered
    ecds: dict[str, Resource] = field(default_factory=dict)  # TypedExtensionConfig by name
    endpoints: dict[str, Resource] = field(default_factory=dict)  # ClusterLoadAssignment (EDS)
    notes: ParseNotes = field(default_factory=ParseNotes)
    # (JSONPath, what) of everything referenced through xDS but absent from the input
    unseen: list[tuple[str, str]] = field(default_factory=list)
    # (JSONPath, what) of parts present but not in effect or not judged (rejected updates)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    lds: bool = False  # listeners come (also) from LDS
    cds: bool = False  # clusters come (also) from CDS


def is_config_dump(raw: Mapping[str, Any]) -> bool:
    return isinstance(raw.get("configs"), list)


def load(raw: object) -> Inventory:
    """The inventory of a parsed YAML/JSON document: a bootstrap or a `/config_dump`."""
    if not isinstance(raw, Mapping):
        raise DoctorError("an Envoy bootstrap or /config_dump must be a mapping at the top level")
    if is_config_dump(raw):
        return _from_dump(raw)
    return _from_bootstrap(raw)


def _bootstrap(raw: object, path: str, notes: ParseNotes) -> Any:
    return parse_message(api_class("envoy.config.bootstrap.v3", "Bootstrap"), raw, path, notes)


def _xds_wiring(inv: Inventory) -> None:
    """Record what the bootstrap's dynamic_resources promise (and an inventory may lack)."""
    dyn = inv.bootstrap.dynamic_resources if inv.bootstrap is not None else None
    if dyn is None:
        return
    base = f"{inv.bootstrap_path}.dynamic_resources"
    inv.lds = dyn.lds_config is not None or bool(dyn.lds_resources_locator)
    inv.cds = dyn.cds_config is not None or bool(dyn.cds_resources_locator)
    if inv.source == "bootstrap":
        if inv.lds:
            inv.unseen.append((f"{base}.lds_config", f"listeners come from LDS "
                               f"({_via(dyn.lds_config)}) and are not in the input"))
        if inv.cds:
            inv.unseen.append((f"{base}.cds_config", f"clusters come from CDS "
                               f"({_via(dyn.cds_config)}) and are not in the input"))


def _via(source: Any) -> str:
    if source is None:
        return "a resources locator"
    if source.ads is not None:
        return "ADS"
    if source.path_config_source is not None or source.path:
        return "files"
    if source.api_config_source is not None:
        names = [g.envoy_grpc.cluster_name for g in source.api_config_source.grpc_services
                 if g.envoy_grpc is not None]
        return f"management server {', '.join(names)}" if names else "a management server"
    return "a config source"


def _from_bootstrap(raw: Mapping[str, Any]) -> Inventory:
    notes = ParseNotes()
    boot = _bootstrap(raw, "$", notes)
    inv = Inventory("bootstrap", boot, "$", notes=notes)
    static = boot.static_resources
    if static is not None:
        for i, listener in enumerate(static.listeners):
            inv.listeners.append(Resource(listener, f"$.static_resources.listeners[{i}]"))
        for i, cluster in enumerate(static.clusters):
            inv.clusters.setdefault(cluster.name,
                                    Resource(cluster, f"$.static_resources.clusters[{i}]"))
    _xds_wiring(inv)
    return inv


def _section_type(section: object) -> str:
    url = section.get("@type") if isinstance(section, Mapping) else None
    return str(url).rsplit("/", 1)[-1] if isinstance(url, str) else ""


def _inner(raw: object, path: str) -> tuple[Mapping[str, Any], str]:
    if not isinstance(raw, Mapping):
        raise DoctorError(f"{path}: expected a resource, got {type(raw).__name__}")
    return {k: v for k, v in raw.items() if k != "@type"}, path


def _from_dump(raw: Mapping[str, Any]) -> Inventory:  # noqa: C901 - its owner (issue 17 splits it); see docs/architecture.md
    notes = ParseNotes()
    unseen_later: list[tuple[str, str]] = []
    sections: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
    for i, section in enumerate(raw["configs"]):
        kind = _section_type(section)
        if not kind:
            raise DoctorError(f"$.configs[{i}]: a /config_dump section needs an '@type'")
        sections.setdefault(kind.removeprefix(_ADMIN), []).append((i, section))
    known = {"BootstrapConfigDump", "ListenersConfigDump", "ClustersConfigDump",
             "RoutesConfigDump", "EcdsConfigDump", "EndpointsConfigDump",
             "ScopedRoutesConfigDump", "SecretsConfigDump"}
    for kind, found in sections.items():
        if kind not in known:
            first = found[0][0]
            unseen_later.append((f"$.configs[{first}]", f"section {kind} was not read (a "
                                 "dump filtered with ?resource=): use the whole /config_dump"))
    boot, bpath = None, "$"
    for i, section in sections.get("BootstrapConfigDump", []):
        bpath = f"$.configs[{i}].bootstrap"
        boot = _bootstrap(section.get("bootstrap", {}), bpath, notes)
    inv = Inventory("config_dump", boot, bpath, notes=notes)
    inv.unseen.extend(unseen_later)
    listener_cls = api_class("envoy.config.listener.v3", "Listener")
    cluster_cls = api_class("envoy.config.cluster.v3", "Cluster")
    route_cls = api_class("envoy.config.route.v3", "RouteConfiguration")
    ecds_cls = api_class("envoy.config.core.v3", "TypedExtensionConfig")
    cla_cls = api_class("envoy.config.endpoint.v3", "ClusterLoadAssignment")

    def parse(cls: Any, node: object, path: str) -> Any:
        body, p = _inner(node, path)
        return parse_message(cls, body, p, notes)

    if "ListenersConfigDump" not in sections and boot is not None and boot.static_resources:
        for j, listener in enumerate(boot.static_resources.listeners):
            inv.listeners.append(Resource(listener, f"{bpath}.static_resources.listeners[{j}]"))
    for i, section in sections.get("ListenersConfigDump", []):
        base = f"$.configs[{i}]"
        for j, entry in enumerate(section.get("static_listeners", [])):
            p = f"{base}.static_listeners[{j}].listener"
            inv.listeners.append(Resource(parse(listener_cls, entry.get("listener"), p), p))
        for j, entry in enumerate(section.get("dynamic_listeners", [])):
            p = f"{base}.dynamic_listeners[{j}]"
            name = entry.get("name", "")
            states = (("active_state", "dynamic"), ("warming_state", "dynamic, warming"))
            for state, origin in states:
                listener = (entry.get(state) or {}).get("listener")
                if listener is not None:
                    lp = f"{p}.{state}.listener"
                    inv.listeners.append(Resource(parse(listener_cls, listener, lp), lp, origin))
            error = entry.get("error_state")
            if error:
                details = str(error.get("details", "")).splitlines()[0:1]
                inv.skipped.append((f"{p}.error_state",
                                    f"an LDS update of listener {name or '(unnamed)'!r} was "
                                    f"rejected by Envoy and is not in effect: "
                                    f"{details[0] if details else 'no details'}"))
    for i, section in sections.get("ClustersConfigDump", []):
        base = f"$.configs[{i}]"
        kinds = (("static_clusters", "static"), ("dynamic_active_clusters", "dynamic"),
                 ("dynamic_warming_clusters", "dynamic, warming"))
        for key, origin in kinds:
            for j, entry in enumerate(section.get(key, [])):
                p = f"{base}.{key}[{j}].cluster"
                cluster = parse(cluster_cls, entry.get("cluster"), p)
                inv.clusters.setdefault(cluster.name, Resource(cluster, p, origin))
    for i, section in sections.get("RoutesConfigDump", []):
        base = f"$.configs[{i}]"
        for key in ("static_route_configs", "dynamic_route_configs"):
            for j, entry in enumerate(section.get(key, [])):
                p = f"{base}.{key}[{j}].route_config"
                rc = parse(route_cls, entry.get("route_config"), p)
                inv.route_configs.setdefault(rc.name, Resource(rc, p, key.split("_")[0]))
    for i, section in sections.get("EcdsConfigDump", []):
        for j, entry in enumerate(section.get("ecds_filters", [])):
            p = f"$.configs[{i}].ecds_filters[{j}].ecds_filter"
            ext = parse(ecds_cls, entry.get("ecds_filter"), p)
            inv.ecds.setdefault(ext.name, Resource(ext, p, "dynamic"))
    for i, section in sections.get("EndpointsConfigDump", []):
        for key in ("static_endpoint_configs", "dynamic_endpoint_configs"):
            for j, entry in enumerate(section.get(key, [])):
                p = f"$.configs[{i}].{key}[{j}].endpoint_config"
                cla = parse(cla_cls, entry.get("endpoint_config"), p)
                inv.endpoints.setdefault(cla.cluster_name, Resource(cla, p))
    if not sections.get("ListenersConfigDump") and not inv.listeners:
        inv.unseen.append(("$.configs", "the dump has no listeners section (filtered with "
                                        "?mask= or ?resource=?): listeners were not checked"))
    _xds_wiring(inv)
    return inv
