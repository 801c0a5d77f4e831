"""Checks of a route configuration against the ext_authz filters in front of it: which routes
skip the check, what request paths that opens, which policy rules it shadows, and the timeouts.

The effective ext_authz state of a route is decided by the most specific
`typed_per_filter_config` entry keyed by the filter's *name* in http_filters (weighted cluster,
route, virtual host, route configuration): Envoy ignores an entry under another key, which the
real binary confirms (tests/cases/doctor/real-world/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from extauthz.tools.doctor import envoy as e
from extauthz.tools.doctor.parsing import type_of, unpack
from extauthz.tools.doctor.policy_facts import PolicyFacts
from extauthz.tools.doctor.routes import Exposure, Normalization, exposure, label, shadows


@dataclass(slots=True)
class AuthzFilter:
    index: int
    name: str
    path: str  # of the http_filters entry
    config_path: str  # of its ExtAuthz message (in the listener, or in the ECDS section)
    config: Any  # ExtAuthz
    timeout: timedelta  # effective check timeout
    disabled: bool  # `disabled: true` on the http_filters entry: off unless a route enables it
    http: bool  # http_service rather than grpc_service


@dataclass(frozen=True, slots=True)
class _State:
    state: str  # "on" | "disabled" | "default_off"
    where: str  # path of the deciding field
    override: Any  # CheckSettings of the deciding ExtAuthzPerRoute, or None


class RouteChecks:
    policy: PolicyFacts | None
    domains: list[tuple[str, str]]
    protected_upstreams: set[str]
    open_upstreams: list[tuple[str, str, str]]

    if TYPE_CHECKING:
        def add(self, check_id: str, path: str, detail: str, subject: str = "") -> None:
            ...
        def service(self, grpc: Any, path: str) -> None:
            ...

    def routes(self, rc: Any, path: str, authz: list[AuthzFilter], label: str,
               norm: Normalization) -> None:
        for vi, vhost in enumerate(rc.virtual_hosts):
            vpath = f"{path}.virtual_hosts[{vi}]"
            for di, domain in enumerate(vhost.domains):
                self.domains.append((str(domain), f"{vpath}.domains[{di}]"))
            if vhost.matcher is not None:
                self.add("config.not_analysed", f"{vpath}.matcher",
                         f"{label}: routes selected by a matcher tree were not checked", label)
            vlabel = f"{label} > virtual host {_vhost_name(vhost, vi)}"
            for a in authz:
                self.vhost_routes(vhost, vpath, a, rc=rc, rc_path=path, label=vlabel, norm=norm)

    def open_routes(self, rc: Any, path: str, label: str) -> None:
        """An HCM without ext_authz: remember where its routes lead."""
        for vhost in rc.virtual_hosts:
            for route in vhost.routes:
                for cluster in _clusters(route):
                    self.open_upstreams.append((cluster, path, label))

    def vhost_routes(
        self, vhost: Any, vpath: str, a: AuthzFilter, *, rc: Any, rc_path: str, label: str,
        norm: Normalization,
    ) -> None:
        longer: list[tuple[str, timedelta]] = []
        routes = list(vhost.routes)
        # one probe path per route, computed once: an exempt route "hides" a later route
        # when it matches that route's first example path
        probes = [(label_of(r), _probe(r)) for r in routes]
        # (check id, path of the deciding field) -> what each route it covers opens: one
        # virtual-host-wide `disabled` is one finding, however many routes it covers
        skips: dict[tuple[str, str], list[str]] = {}
        for ri, route in enumerate(routes):
            rpath = f"{vpath}.routes[{ri}]"
            rlabel = f"route #{ri + 1} '{label_of(route)}'"
            levels = ((route, rpath), (vhost, vpath), (rc, rc_path))
            st = _per_route(levels, a)
            forwards = route.route is not None
            if forwards and st.state == "on":
                self.protected_upstreams.update(_clusters(route))
            skipped = [(st.state, st.where)] if st.state != "on" else []
            for wc, wpath in _weighted(route, rpath):
                wst = _per_route(((wc, wpath), *levels), a)
                if wst.state == "disabled" and wst.where.startswith(wpath):
                    skipped.append((wst.state, wst.where))
            if forwards and skipped:
                found = self.skipping(route, probes[ri + 1:], skipped, a=a, vhost=vhost,
                                      label=rlabel, norm=norm)
                if found is not None:
                    skips.setdefault(found[:2], []).append(found[2])
            if st.override is not None:
                self.check_settings(st.override, st.where, a, f"{label} > {rlabel}")
            if st.state == "on" and forwards:
                check_timeout = a.timeout
                grpc = st.override.grpc_service if st.override is not None else None
                if grpc is not None and grpc.timeout is not None:
                    check_timeout = grpc.timeout
                rt = route.route.timeout
                route_timeout = e.DEFAULT_ROUTE_TIMEOUT if rt is None else rt
                if route_timeout > timedelta(0) and check_timeout > route_timeout:
                    longer.append((f"{rlabel} ({e.seconds(route_timeout)})", check_timeout))
        for (check, where), details in skips.items():
            if len(details) == 1:
                self.add(check, where, f"{label} > {details[0]}", label)
            else:
                self.add(check, where, f"{label}: one setting skips ext_authz on "
                         f"{len(details)} routes: " + "; ".join(details[:3])
                         + (f"; and {len(details) - 3} more" if len(details) > 3 else ""), label)
        if longer:
            timeout = longer[0][1]
            field = "http_service.server_uri.timeout" if a.http else "grpc_service.timeout"
            self.add("ext_authz.timeout_exceeds_route", f"{a.config_path}.{field}",
                     f"{label}: the check may take {e.seconds(timeout)}, longer than "
                     f"{_few([n for n, _ in longer])}", label)

    def skipping(self, route: Any, later: Sequence[tuple[str, str | None]],
                 skipped: list[tuple[str, str]], *, a: AuthzFilter, vhost: Any, label: str,
                 norm: Normalization) -> tuple[str, str, str] | None:
        """(check id, path of the deciding field, what the route opens), or None when the
        route only opens an exact health path."""
        exp = exposure(route.match, norm)
        if exp.quiet:
            return None
        detail = f"{label}: ext_authz is skipped for {exp.describe()}"
        conditions = _conditions(route.match)
        if conditions:
            detail += f" (when {conditions}, which the caller controls)"
        hidden = [f"route '{name}'" for name, probe in later
                  if probe is not None and (exp.everything or exp.matches(probe))]
        if hidden:
            detail += f"; it is listed before {_few(hidden)}, which never see those requests"
        shadowed = self._shadowed(exp, vhost)
        if shadowed:
            detail += f"; shadows policy rules {_few(shadowed)}"
        state, where = skipped[0]
        check = "ext_authz.disabled_by_default" if state == "default_off" else \
            "route.ext_authz_disabled"
        return check, (f"{a.path}.disabled" if state == "default_off" else where), detail

    def _shadowed(self, exp: Exposure, vhost: Any) -> list[str]:
        if self.policy is None:
            return []
        domains = [str(d) for d in vhost.domains]
        out = []
        for rule in self.policy.rules:
            if not any(e.domain_matches(d, h) for d in domains for h in rule.hosts):
                continue
            if shadows(exp, rule.path):
                out.append(rule.describe())
        return out

    def check_settings(self, settings: Any, where: str, a: AuthzFilter, label: str) -> None:
        if settings.grpc_service is not None:
            self.service(settings.grpc_service, f"{where}.check_settings.grpc_service")
        elif settings.http_service is not None and settings.http_service.server_uri is not None:
            uri = settings.http_service.server_uri
            clusters: dict[str, list[tuple[str, str]]] = getattr(self, "authz_clusters", {})
            clusters.setdefault(uri.cluster, []).append(
                (f"{where}.check_settings.http_service.server_uri.cluster", "http"))
        http = a.http and settings.grpc_service is None
        if http and settings.context_extensions:
            self.add("ext_authz.grpc_only_setting", f"{where}.check_settings.context_extensions",
                     f"{label}: context_extensions never reach an http_service", label)
        if settings.with_request_body is not None:
            self.add("ext_authz.request_body_buffered",
                     f"{where}.check_settings.with_request_body",
                     f"{label}: with_request_body buffers request bodies on this route", label)


def label_of(route: Any) -> str:
    text = label(route.match)
    return f"{text} ({route.name})" if route.name else text


def _vhost_name(vhost: Any, index: int) -> str:
    return repr(str(vhost.name)) if vhost.name else f"#{index + 1}"


def _few(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _conditions(match: Any) -> str:
    if match is None:
        return ""
    parts = [f"header {h.name}" for h in match.headers]
    parts += [f"query parameter {q.name}" for q in match.query_parameters]
    return " and ".join(parts)


def _probe(route: Any) -> str | None:
    """A path the route serves (None for routes that do not forward)."""
    if route.route is None:
        return None
    examples = exposure(route.match, Normalization(True, True, False)).examples
    return examples[0] if examples else None


def _clusters(route: Any) -> list[str]:
    action = route.route
    if action is None:
        return []
    if action.cluster:
        return [str(action.cluster)]
    wc = action.weighted_clusters
    return [str(c.name) for c in wc.clusters] if wc is not None else []


def _weighted(route: Any, rpath: str) -> list[tuple[Any, str]]:
    action = route.route
    wc = action.weighted_clusters if action is not None else None
    if wc is None:
        return []
    return [(c, f"{rpath}.route.weighted_clusters.clusters[{i}]")
            for i, c in enumerate(wc.clusters)]


def _per_route(levels: Sequence[tuple[Any, str]], a: AuthzFilter) -> _State:
    """The effective state of filter `a` on a route. The most specific typed_per_filter_config
    (weighted cluster, route, virtual host, route configuration) wins."""
    for obj, path in levels:
        entry = obj.typed_per_filter_config.get(a.name) if obj.typed_per_filter_config else None
        if entry is None:
            continue
        epath = f'{path}.typed_per_filter_config["{a.name}"]'
        kind = type_of(entry)
        msg = unpack(entry)
        if kind == e.FILTER_CONFIG and msg is not None:
            if msg.disabled:
                return _State("disabled", f"{epath}.disabled", None)
            kind, msg, epath = type_of(msg.config), unpack(msg.config), f"{epath}.config"
        if kind == e.EXT_AUTHZ_PER_ROUTE and msg is not None:
            if msg.disabled:
                return _State("disabled", f"{epath}.disabled", None)
            return _State("on", epath, msg.check_settings)
        return _State("on", epath, None)
    # No per-route config: the filter's own default.
    return _State("default_off" if a.disabled else "on", a.path, None)
