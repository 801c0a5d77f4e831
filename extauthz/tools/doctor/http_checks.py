"""Checks of one HTTP connection manager: its filter chain, the ext_authz filter settings, path
normalization, XFCC, and what the HTTP transport of extauthz needs from both."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

import re2

from extauthz.tools.doctor import envoy as e
from extauthz.tools.doctor.inputs import Inventory
from extauthz.tools.doctor.parsing import type_of, unpack
from extauthz.tools.doctor.policy_facts import PolicyFacts
from extauthz.tools.doctor.route_checks import AuthzFilter
from extauthz.tools.doctor.routes import Normalization

_UNSEEN = "?"  # an ECDS filter that is not in the input
_UNSEEN_AUTHZ = "?ext_authz"  # ... and its type_urls say it is ext_authz
_GRPC_ONLY = (
    ("include_peer_certificate", "include_peer_certificate"),
    ("include_tls_session", "include_tls_session"),
    ("metadata_context_namespaces", "metadata_context_namespaces"),
    ("typed_metadata_context_namespaces", "typed_metadata_context_namespaces"),
    ("route_metadata_context_namespaces", "route_metadata_context_namespaces"),
    ("route_typed_metadata_context_namespaces", "route_typed_metadata_context_namespaces"),
)


class HttpChecks:
    inv: Inventory
    policy: PolicyFacts | None
    authz_clusters: dict[str, list[tuple[str, str]]]
    routes_known: bool
    ext_authz_seen: bool
    http_ext_authz_seen: bool

    if TYPE_CHECKING:
        def add(self, check_id: str, path: str, detail: str, subject: str = "") -> None:
            ...
        def timeout(self, timeout: timedelta | None, path: str, label: str) -> None:
            ...
        def routes(self, rc: Any, path: str, authz: list[AuthzFilter], label: str,
                   norm: Normalization) -> None:
            ...
        def open_routes(self, rc: Any, path: str, label: str) -> None:
            ...

    def _filter_type(self, f: Any, fpath: str, label: str) -> tuple[str, Any, str]:
        """(type name, typed message or None, path of the config) of an http filter, resolving
        ECDS from the inventory and legacy names of config-less filters."""
        if f.config_discovery is not None:
            found = self.inv.ecds.get(f.name)
            if found is not None:
                ext = found.obj
                return type_of(ext.typed_config), unpack(ext.typed_config), \
                    f"{found.path}.typed_config"
            urls = [u.rsplit("/", 1)[-1] for u in f.config_discovery.type_urls]
            what = f" ({', '.join(u.rsplit('.', 1)[-1] for u in urls)})" if urls else ""
            self.add("config.xds_not_seen", f"{fpath}.config_discovery",
                     f"{label}: http filter {f.name!r}{what} comes from ECDS and is not in "
                     "the input", label)
            if e.EXT_AUTHZ in urls:
                self.ext_authz_seen = True  # there is one; its settings are unknown
                return _UNSEEN_AUTHZ, None, fpath
            return _UNSEEN, None, fpath
        if f.typed_config is None:
            return (e.ROUTER if f.name in e.ROUTER_NAMES else ""), None, fpath
        kind = type_of(f.typed_config)
        msg = unpack(f.typed_config)
        if kind and msg is None:
            self.add("config.not_analysed", f"{fpath}.typed_config",
                     f"{label}: http filter {f.name!r} has type {kind}, unknown to "
                     "envoy-data-plane", label)
        return kind, msg, f"{fpath}.typed_config"

    def hcm(self, hcm: Any, path: str, label: str) -> bool:
        """Check one HCM; True when it has an ext_authz filter."""
        filters = list(enumerate(hcm.http_filters))
        authz: list[AuthzFilter] = []
        router: int | None = None
        kinds: list[tuple[int, str, Any, str]] = []  # index, type, message, path
        for i, f in filters:
            fpath = f"{path}.http_filters[{i}]"
            kind, msg, cpath = self._filter_type(f, fpath, label)
            kinds.append((i, kind, msg, fpath))
            if kind == e.EXT_AUTHZ and msg is not None:
                grpc = msg.grpc_service
                timeout = grpc.timeout if grpc is not None else None
                if msg.http_service is not None and msg.http_service.server_uri is not None:
                    timeout = msg.http_service.server_uri.timeout
                authz.append(AuthzFilter(i, f.name, fpath, cpath, msg,
                                         e.DEFAULT_CHECK_TIMEOUT if timeout is None else timeout,
                                         bool(f.disabled), msg.http_service is not None))
            elif kind == e.ROUTER and router is None:
                router = i
        unseen = any(k in (_UNSEEN, _UNSEEN_AUTHZ) for _, k, _, _ in kinds)
        if router is None and not unseen:
            self.add("hcm.no_router", f"{path}.http_filters",
                     f"{label}: no envoy.filters.http.router among {len(filters)} http_filters",
                     label)
        norm = _normalization(hcm)
        if not authz:
            if any(k == _UNSEEN_AUTHZ for _, k, _, _ in kinds):
                # an ECDS ext_authz we cannot see (reported): say what else is missing
                self.routes_known = False
                self._route_config(hcm, path, label, report=True)
                return False
            self.add("hcm.no_ext_authz", f"{path}.http_filters",
                     f"{label}: this HTTP connection manager has no ext_authz filter", label)
            rc = self._route_config(hcm, path, label, report=False)
            if rc is not None:
                self.open_routes(rc[0], f"{path}.http_filters", label)
            return False
        self.ext_authz_seen = True
        self.http_ext_authz_seen = True
        for a in authz:
            flabel = f"{label} > http filter {a.name!r}"
            self.ext_authz(a, flabel)
            self.order(a, kinds, filters, router, label)
            if a.http:
                self.http_identity(hcm, path, a, flabel)
        self.stripped(kinds, authz[0].index, path, label)
        self.path_settings(hcm, path, label)
        self.xfcc(hcm, path, label)
        found = self._route_config(hcm, path, label, report=True)
        if found is not None:
            self.routes(found[0], found[1], authz, label, norm)
        else:
            self.routes_known = False
            for a in authz:
                if a.disabled:
                    self.add("ext_authz.disabled_by_default", f"{a.path}.disabled",
                             f"{label}: unchecked on every route that does not enable it "
                             "(routes not in the input)", label)
        return True

    def _route_config(
        self, hcm: Any, path: str, label: str, *, report: bool
    ) -> tuple[Any, str] | None:
        if hcm.route_config is not None:
            return hcm.route_config, f"{path}.route_config"
        if hcm.rds is not None:
            name = hcm.rds.route_config_name
            found = self.inv.route_configs.get(name)
            if found is not None:
                return found.obj, found.path
            if report:
                self.add("config.xds_not_seen", f"{path}.rds",
                         f"{label}: route configuration {name!r} comes from RDS and is not in "
                         "the input; per-route ext_authz settings, route timeouts and domains "
                         "were not checked", label)
            return None
        if report:
            self.add("config.xds_not_seen", f"{path}.scoped_routes",
                     f"{label}: routes come from scoped RDS, which the doctor does not follow; "
                     "per-route ext_authz settings were not checked", label)
        return None

    def order(self, a: AuthzFilter, kinds: list[tuple[int, str, Any, str]],
              filters: list[tuple[int, Any]], router: int | None, label: str) -> None:
        if router is not None and a.index > router:
            self.add("ext_authz.after_router", a.path,
                     f"{label}: ext_authz is http_filters[{a.index}], the router is "
                     f"http_filters[{router}]", label)
        end = router if router is not None else len(filters)
        for i, kind, msg, fpath in kinds:
            what = e.describe(filters[i][1].name, kind, i)
            if i < a.index:
                why = e.rewrites_request(kind, msg)
                if why is not None:
                    self.add("ext_authz.after_request_rewriter", fpath,
                             f"{label}: {what} runs before ext_authz "
                             f"(http_filters[{a.index}]): {why}", label)
            elif a.index < i < end:
                why = e.reroutes(kind, msg)
                if why is not None:
                    self.add("ext_authz.reroute_after_check", fpath,
                             f"{label}: {what} runs after ext_authz "
                             f"(http_filters[{a.index}]): {why}", label)

    def stripped(self, kinds: list[tuple[int, str, Any, str]], first: int, path: str,
                 label: str) -> None:
        names: set[str] = set()
        prefixes: set[str] = set()
        for i, kind, msg, _ in kinds:
            if i < first and kind == e.HEADER_MUTATION:
                n, p = e.removed_headers(msg)
                names |= n
                prefixes |= p
        kept = [h for h in e.TRUSTED_HEADERS
                if h not in names and not any(h.startswith(p) for p in prefixes)]
        if kept:
            self.add("hcm.extauthz_headers_not_stripped", f"{path}.http_filters",
                     f"{label}: no filter before ext_authz removes {', '.join(kept)}", label)

    def ext_authz(self, a: AuthzFilter, label: str) -> None:
        cfg, path = a.config, a.config_path
        if cfg.failure_mode_allow:
            self.add("ext_authz.failure_mode_allow", f"{path}.failure_mode_allow",
                     f"{label}: failure_mode_allow is true", label)
        if cfg.shadow_mode:
            self.add("ext_authz.shadow_mode", f"{path}.shadow_mode",
                     f"{label}: shadow_mode is true", label)
        self.enabled(cfg, path, label)
        if cfg.grpc_service is not None:
            self.timeout(cfg.grpc_service.timeout, f"{path}.grpc_service.timeout", label)
            self.service(cfg.grpc_service, f"{path}.grpc_service")
        elif cfg.http_service is not None and cfg.http_service.server_uri is not None:
            self.authz_clusters.setdefault(cfg.http_service.server_uri.cluster, []).append(
                (f"{path}.http_service.server_uri.cluster", "http"))
        status = cfg.status_on_error
        code = int(status.code.value) if status is not None else 0
        if code == 0:
            self.add("ext_authz.status_on_error_unset", f"{path}.status_on_error",
                     f"{label}: status_on_error is unset (Envoy answers 403 on errors)", label)
        elif code in (401, 403):
            self.add("ext_authz.status_on_error_denial", f"{path}.status_on_error.code",
                     f"{label}: status_on_error is {code}, the status of a denial", label)
        elif code != 503:
            self.add("ext_authz.status_on_error_not_503", f"{path}.status_on_error.code",
                     f"{label}: status_on_error is {code}; extauthz answers 503 for errors",
                     label)
        if a.http:
            for attr, shown in _GRPC_ONLY:
                if getattr(cfg, attr, None):
                    self.add("ext_authz.grpc_only_setting", f"{path}.{attr}",
                             f"{label}: {shown} is set on an http_service filter", label)
            wrb = cfg.with_request_body
            if wrb is not None and wrb.pack_as_bytes:
                self.add("ext_authz.grpc_only_setting", f"{path}.with_request_body.pack_as_bytes",
                         f"{label}: with_request_body.pack_as_bytes is set on an http_service "
                         "filter", label)
        elif not cfg.include_peer_certificate:
            self.add("ext_authz.peer_certificate_not_included",
                     f"{path}.include_peer_certificate",
                     f"{label}: include_peer_certificate is not true", label)
        if cfg.with_request_body is not None:
            self.add("ext_authz.request_body_buffered", f"{path}.with_request_body",
                     f"{label}: with_request_body buffers up to "
                     f"{cfg.with_request_body.max_request_bytes} bytes of every request", label)

    def enabled(self, cfg: Any, path: str, label: str) -> None:
        deny = cfg.deny_at_disable
        if deny is not None and deny.default_value is True:
            return
        fe = cfg.filter_enabled
        if fe is not None:
            pct = fe.default_value
            share = 0.0
            if pct is not None:
                denominators = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}
                share = pct.numerator / denominators.get(pct.denominator.name, 100)
            if share < 1.0:
                self.add("ext_authz.partially_enabled", f"{path}.filter_enabled",
                         f"{label}: filter_enabled lets {100 * (1 - share):g}% of requests "
                         "to every route through unchecked", label)
            elif fe.runtime_key:
                self.add("ext_authz.partially_enabled", f"{path}.filter_enabled.runtime_key",
                         f"{label}: runtime key {fe.runtime_key!r} can turn checks off", label)
        if cfg.filter_enabled_metadata is not None:
            self.add("ext_authz.partially_enabled", f"{path}.filter_enabled_metadata",
                     f"{label}: requests whose metadata does not match are not checked", label)

    def service(self, grpc: Any, path: str) -> None:
        if grpc.envoy_grpc is not None:
            self.authz_clusters.setdefault(grpc.envoy_grpc.cluster_name, []).append(
                (f"{path}.envoy_grpc.cluster_name", "grpc"))
        elif grpc.google_grpc is not None:
            g = grpc.google_grpc
            creds = g.channel_credentials
            secure = creds is not None and (
                creds.ssl_credentials is not None or creds.google_default is not None
            )
            target = str(g.target_uri)
            host = target.split("://", 1)[-1]
            local = target.startswith(("unix:", "unix-abstract:")) or e.is_loopback(
                e.domain_host(host.rsplit("/", 1)[-1] if "/" in host else host)
            )
            if not secure and not local:
                self.add("authz_cluster.plaintext", f"{path}.google_grpc",
                         f"google_grpc target {target!r} has no TLS channel credentials")

    def http_identity(self, hcm: Any, path: str, a: AuthzFilter, label: str) -> None:
        mode = hcm.forward_client_cert_details.name
        details = hcm.set_current_client_cert_details
        if mode != "SANITIZE_SET":
            effect = ("the caller chooses the identity extauthz authorizes" if mode != "SANITIZE"
                      else "extauthz gets no identity and denies every request")
            self.add("ext_authz.http_service_xfcc", f"{path}.forward_client_cert_details",
                     f"{label}: http_service with forward_client_cert_details {mode}: {effect}",
                     label)
        elif details is None or not details.uri:
            self.add("ext_authz.http_service_xfcc", f"{path}.set_current_client_cert_details",
                     f"{label}: http_service with SANITIZE_SET but without "
                     "set_current_client_cert_details.uri: no SPIFFE ID reaches extauthz", label)
        if not _passes_header(a.config, e.XFCC):
            self.add("ext_authz.http_service_xfcc", f"{a.config_path}.allowed_headers",
                     f"{label}: allowed_headers does not pass {e.XFCC} to the http_service, so "
                     "extauthz never sees the caller's identity", label)

    def path_settings(self, hcm: Any, path: str, label: str) -> None:
        if self.policy is not None and not self.policy.matches_on_path:
            return
        why = ("policy rules match on paths" if self.policy is not None
               else "no --policy given: assuming rules match on paths")
        if hcm.normalize_path is not True:
            self.add("hcm.normalize_path_off", f"{path}.normalize_path",
                     f"{label}: normalize_path is "
                     f"{'false' if hcm.normalize_path is False else 'unset'} ({why})", label)
        if not hcm.merge_slashes:
            self.add("hcm.merge_slashes_off", f"{path}.merge_slashes",
                     f"{label}: merge_slashes is off ({why})", label)
        action = hcm.path_with_escaped_slashes_action.name
        if action in ("IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED"):
            shown = "unset" if action == "IMPLEMENTATION_SPECIFIC_DEFAULT" else action
            self.add("hcm.escaped_slashes_kept", f"{path}.path_with_escaped_slashes_action",
                     f"{label}: path_with_escaped_slashes_action is {shown} ({why})", label)

    def xfcc(self, hcm: Any, path: str, label: str) -> None:
        mode = hcm.forward_client_cert_details.name
        if mode in ("FORWARD_ONLY", "APPEND_FORWARD"):
            self.add("hcm.xfcc_forwarded", f"{path}.forward_client_cert_details",
                     f"{label}: forward_client_cert_details is {mode} in front of ext_authz",
                     label)
        elif mode == "ALWAYS_FORWARD_ONLY":
            self.add("hcm.xfcc_always_forwarded", f"{path}.forward_client_cert_details",
                     f"{label}: forward_client_cert_details is {mode} in front of ext_authz",
                     label)


def _normalization(hcm: Any) -> Normalization:
    action = hcm.path_with_escaped_slashes_action.name
    return Normalization(
        normalize_path=hcm.normalize_path is True,
        merge_slashes=bool(hcm.merge_slashes),
        escaped_slashes_kept=action in ("IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED"),
    )


def _string_match(m: Any, value: str) -> bool:
    def fold(s: str) -> str:
        return s.lower() if m.ignore_case else s

    v = fold(value)
    if m.exact is not None:
        return fold(str(m.exact)) == v
    if m.prefix is not None:
        return v.startswith(fold(str(m.prefix)))
    if m.suffix is not None:
        return v.endswith(fold(str(m.suffix)))
    if m.contains is not None:
        return fold(str(m.contains)) in v
    if m.safe_regex is not None:
        try:
            return re2.fullmatch(str(m.safe_regex.regex), value) is not None
        except re2.error:
            return True  # cannot tell: do not accuse
    return False


def _passes_header(cfg: Any, header: str) -> bool:
    """Does the HTTP check request carry `header`? (allowed_headers, minus disallowed)."""
    lists = [cfg.allowed_headers]
    req = cfg.http_service.authorization_request if cfg.http_service is not None else None
    if req is not None:
        lists.append(req.allowed_headers)
    allowed = any(lst is not None and any(_string_match(m, header) for m in lst.patterns)
                  for lst in lists)
    dis = cfg.disallowed_headers
    if dis is not None and any(_string_match(m, header) for m in dis.patterns):
        return False
    return allowed
