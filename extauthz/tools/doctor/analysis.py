"""The walk over an Envoy config: listeners → HTTP connection managers → ext_authz filters and
routes → the authz clusters, adding one finding per unsafe setting.

Every finding names the thing it is about by name or, for unnamed things, by position
(`unnamed listener #2 on 0.0.0.0:10000`), never as "the listener": a config with several
unnamed listeners must still say which one is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from extauthz.tools.doctor import envoy as e
from extauthz.tools.doctor.catalog import CHECKS
from extauthz.tools.doctor.http_checks import HttpChecks
from extauthz.tools.doctor.inputs import Inventory, Resource
from extauthz.tools.doctor.parsing import type_of, unpack
from extauthz.tools.doctor.policy_facts import PolicyFacts
from extauthz.tools.doctor.route_checks import AuthzFilter, RouteChecks
from extauthz.tools.findings import Finding


@dataclass(slots=True)
class Doctor(HttpChecks, RouteChecks):
    inv: Inventory
    policy: PolicyFacts | None
    findings: list[Finding] = field(default_factory=list)
    # cluster name -> [(path of the reference, protocol "grpc" | "http")]
    authz_clusters: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    domains: list[tuple[str, str]] = field(default_factory=list)  # (domain, path)
    routes_known: bool = True
    ext_authz_seen: bool = False
    http_ext_authz_seen: bool = False
    protected_upstreams: set[str] = field(default_factory=set)
    # (cluster, path of the unprotected HCM, label) for routes served without ext_authz
    open_upstreams: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, check_id: str, path: str, detail: str, subject: str = "") -> None:
        check = CHECKS[check_id]
        self.findings.append(Finding(check_id, check.severity, detail, path=path,
                                     subject=subject))

    def run(self) -> list[Finding]:
        for fpath, what in self.inv.notes.unknown_fields:
            self.add("config.unknown_field", fpath, what)
        for upath, what in self.inv.unseen:
            self.add("config.xds_not_seen", upath, what)
        for spath, what in self.inv.skipped:
            self.add("config.not_analysed", spath, what)
        self.admin()
        unnamed = 0
        for res in self.inv.listeners:
            name = res.obj.name
            if not name:
                unnamed += 1
            self.listener(res, _listener_label(res, unnamed))
        if not self.inv.listeners and not self.inv.lds and not self.inv.unseen:
            self.add("config.no_ext_authz", self.inv.bootstrap_path,
                     "the input has no listeners at all: nothing here is authorized")
        if not self.ext_authz_seen and self.inv.listeners:
            self.findings = [f for f in self.findings if f.code != "hcm.no_ext_authz"]
            self.add("config.no_ext_authz", self._listeners_path(),
                     "no http_filters entry of type ExtAuthz in any listener")
        for cluster, path, label in self.open_upstreams:
            if cluster in self.protected_upstreams:
                # the stronger finding replaces the informational one for this HCM
                self.findings = [f for f in self.findings
                                 if not (f.code == "hcm.no_ext_authz" and f.path == path)]
                self.add("hcm.unprotected_upstream", path,
                         f"{label}: routes to cluster {cluster!r} without ext_authz, while "
                         "other routes reach it only through ext_authz", label)
        self.clusters()
        if self.policy is not None and self.routes_known and self.http_ext_authz_seen:
            self.policy_hosts()
        return e_sort(self.findings)

    def _listeners_path(self) -> str:
        return self.inv.listeners[0].path.rsplit("[", 1)[0]

    def admin(self) -> None:
        boot = self.inv.bootstrap
        admin = boot.admin if boot is not None else None
        if admin is None or admin.address is None:
            return
        sa = admin.address.socket_address
        if sa is not None and not e.is_loopback(str(sa.address)):
            self.add("admin.not_loopback",
                     f"{self.inv.bootstrap_path}.admin.address.socket_address.address",
                     f"the admin interface listens on {sa.address}:{sa.port_value}")

    # --- listeners

    def listener(self, res: Resource, label: str) -> None:
        listener, path = res.obj, res.path
        chains = [
            (f"{path}.filter_chains[{ci}]", fc) for ci, fc in enumerate(listener.filter_chains)
        ]
        if listener.default_filter_chain is not None:
            chains.append((f"{path}.default_filter_chain", listener.default_filter_chain))
        many = len(chains) > 1
        for ci, (cpath, chain) in enumerate(chains):
            clabel = f"{label} filter chain #{ci + 1}" if many else label
            if chain.name and many:
                clabel = f"{label} filter chain {chain.name!r}"
            for fi, flt in enumerate(chain.filters):
                fpath = f"{cpath}.filters[{fi}]"
                if flt.config_discovery is not None:
                    self.add("config.xds_not_seen", f"{fpath}.config_discovery",
                             f"{clabel}: network filter {flt.name!r} comes from ECDS and is not "
                             "in the input", clabel)
                    continue
                kind = type_of(flt.typed_config)
                if kind == e.NETWORK_EXT_AUTHZ:
                    cfg = unpack(flt.typed_config)
                    if cfg is not None:
                        self.network_ext_authz(cfg, f"{fpath}.typed_config", clabel)
                        self.downstream_tls(chain, cpath, clabel)
                    continue
                if kind != e.HCM:
                    continue
                hcm = unpack(flt.typed_config)
                if hcm is None:
                    continue
                if self.hcm(hcm, f"{fpath}.typed_config", clabel):
                    self.downstream_tls(chain, cpath, clabel)

    def network_ext_authz(self, cfg: Any, path: str, label: str) -> None:
        """The network (TCP) ext_authz filter: one check per connection. It has no
        status_on_error (a failed check closes the connection), so only the settings it shares
        with the HTTP filter are checked, under the same ids."""
        self.ext_authz_seen = True
        if cfg.failure_mode_allow:
            self.add("ext_authz.failure_mode_allow", f"{path}.failure_mode_allow",
                     f"{label}: network ext_authz failure_mode_allow is true", label)
        if cfg.filter_enabled_metadata is not None:
            self.add("ext_authz.partially_enabled", f"{path}.filter_enabled_metadata",
                     f"{label}: connections whose metadata does not match are not checked", label)
        if not cfg.include_peer_certificate:
            self.add("ext_authz.peer_certificate_not_included",
                     f"{path}.include_peer_certificate",
                     f"{label}: include_peer_certificate is not true", label)
        grpc = cfg.grpc_service
        if grpc is None:
            return
        self.timeout(grpc.timeout, f"{path}.grpc_service.timeout", label)
        self.service(grpc, f"{path}.grpc_service")

    def timeout(self, timeout: timedelta | None, path: str, label: str) -> None:
        if timeout is None:
            self.add("ext_authz.timeout_missing", path,
                     f"{label}: grpc_service.timeout is unset (Envoy applies 200ms)", label)
        elif timeout <= timedelta(0):
            self.add("ext_authz.timeout_missing", path,
                     f"{label}: grpc_service.timeout is 0s (no deadline)", label)

    def downstream_tls(self, chain: Any, cpath: str, label: str) -> None:
        socket = chain.transport_socket
        base = f"{cpath}.transport_socket"
        kind = type_of(socket.typed_config) if socket is not None else ""
        tls = unpack(socket.typed_config) if socket is not None else None
        tpath = f"{base}.typed_config"
        if kind == e.QUIC_DOWNSTREAM and tls is not None:
            tls, kind = tls.downstream_tls_context, e.DOWNSTREAM_TLS
            tpath = f"{tpath}.downstream_tls_context"
        if kind in ("", e.RAW_BUFFER):
            self.add("listener.plaintext", base,
                     f"{label}: the filter chain with ext_authz has "
                     f"{'a raw_buffer' if kind else 'no'} transport socket (plaintext)", label)
            return
        if kind != e.DOWNSTREAM_TLS or tls is None:
            self.add("config.not_analysed", base,
                     f"{label}: transport socket {kind} was not analysed", label)
            return
        if tls.require_client_certificate is not True:
            self.add("listener.client_cert_optional", f"{tpath}.require_client_certificate",
                     f"{label}: require_client_certificate is "
                     f"{'false' if tls.require_client_certificate is False else 'unset'}", label)
        problem = _validation_problem(tls.common_tls_context)
        if problem is not None:
            where, text = problem
            self.add("listener.client_cert_unverified", f"{tpath}.common_tls_context{where}",
                     f"{label}: {text}", label)

    # --- clusters

    def clusters(self) -> None:
        for name, referrers in sorted(self.authz_clusters.items()):
            ref = referrers[0][0]
            protocols = {proto for _, proto in referrers}
            res = self.inv.clusters.get(name)
            if res is None:
                if self.inv.cds and self.inv.source == "bootstrap":
                    self.add("config.xds_not_seen", ref,
                             f"authz cluster {name!r} comes from CDS and is not in the input")
                else:
                    where = ("among the clusters Envoy runs" if self.inv.source == "config_dump"
                             else "and there is no CDS")
                    self.add("authz_cluster.missing", ref,
                             f"cluster {name!r} is not defined {where}")
                continue
            self.cluster(res, protocols, ref)

    def cluster(self, res: Resource, protocols: set[str], ref: str) -> None:
        c, path = res.obj, res.path
        label = f"authz cluster {c.name!r}"
        # transport_socket_matches may pick TLS per endpoint: not second-guessed here.
        tls = bool(c.transport_socket_matches) or (
            c.transport_socket is not None
            and type_of(c.transport_socket.typed_config) == e.UPSTREAM_TLS
        )
        h2 = _speaks_h2(c, tls)
        if "grpc" in protocols and not h2:
            self.add("authz_cluster.not_http2", f"{path}.typed_extension_protocol_options",
                     f"{label} has no HTTP/2 protocol options")
        self.protocol_mismatch(c, path, protocols, ref, label)
        if not c.health_checks:
            self.add("authz_cluster.no_health_check", f"{path}.health_checks",
                     f"{label} has no health_checks")
        if tls:
            return
        la = c.load_assignment
        if la is None and c.name in self.inv.endpoints:
            la = self.inv.endpoints[c.name].obj
        if la is None:
            self.add("config.xds_not_seen", f"{path}.eds_cluster_config",
                     f"{label}: endpoints come from EDS and are not in the input, so whether the "
                     "check crosses the network in plaintext was not checked "
                     "(a /config_dump?include_eds has them)")
            return
        remote = [a for a in _endpoint_hosts(la) if not e.is_loopback(a)]
        if remote:
            self.add("authz_cluster.plaintext", f"{path}.transport_socket",
                     f"{label} reaches {', '.join(sorted(set(remote)))} without TLS")

    def protocol_mismatch(
        self, c: Any, path: str, protocols: set[str], ref: str, label: str
    ) -> None:
        grpc_hc = any(h.grpc_health_check is not None for h in c.health_checks)
        http_hc = any(h.http_health_check is not None for h in c.health_checks)
        if protocols == {"grpc", "http"}:
            self.add("ext_authz.protocol_mismatch", ref,
                     f"{label} is reached with grpc_service by one ext_authz filter and with "
                     "http_service by another: one of them talks to the wrong server")
        elif protocols == {"http"} and grpc_hc and not http_hc:
            self.add("ext_authz.protocol_mismatch", ref,
                     f"http_service points at {label}, which is health-checked with gRPC "
                     "(a gRPC server)")
        elif protocols == {"grpc"} and http_hc and not grpc_hc:
            self.add("ext_authz.protocol_mismatch", ref,
                     f"grpc_service points at {label}, which is health-checked with HTTP "
                     "(an HTTP server)")
        elif protocols == {"http"} and _http2_only(c):
            self.add("ext_authz.protocol_mismatch", ref,
                     f"http_service points at {label}, which only speaks HTTP/2 (what a gRPC "
                     "server needs); extauthz's --http-listen speaks HTTP/1.1")

    # --- policy

    def policy_hosts(self) -> None:
        assert self.policy is not None
        for host in self.policy.hosts:
            if not any(e.domain_matches(d, host) for d, _ in self.domains):
                self.add("policy.host_not_served", self._listeners_path(),
                         f"policy host {host!r} matches no virtual host domain")
        for domain, path in self.domains:
            if not any(e.domain_matches(domain, h) for h in self.policy.hosts):
                self.add("vhost.domain_without_policy", path,
                         f"domain {domain!r} matches no policy host")


def e_sort(findings: Sequence[Finding]) -> list[Finding]:
    def natural(path: str) -> tuple[object, ...]:
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path))

    unique = {(f.code, f.path, f.message): f for f in findings}
    return sorted(unique.values(),
                  key=lambda f: (-f.severity, natural(f.path), f.code, f.message))


def _listener_label(res: Resource, unnamed: int) -> str:
    listener = res.obj
    origin = "" if res.origin == "static" else f" ({res.origin})"
    if listener.name:
        return f"listener {listener.name!r}{origin}"
    address = ""
    sa = listener.address.socket_address if listener.address is not None else None
    if sa is not None:
        address = f" on {sa.address}:{sa.port_value}"
    elif listener.address is not None and listener.address.pipe is not None:
        address = f" on {listener.address.pipe.path}"
    return f"unnamed listener #{unnamed}{address}{origin}"


def _validation_problem(common: Any) -> tuple[str, str] | None:
    if common is None:
        return "", "no common_tls_context, so no client certificate validation"
    vc = common.validation_context
    path = ".validation_context"
    if vc is None and common.combined_validation_context is not None:
        vc = common.combined_validation_context.default_validation_context
        path = ".combined_validation_context.default_validation_context"
        if vc is None:
            return None  # SDS-provided validation context: cannot see it, assume configured
    if vc is None:
        if (
            common.validation_context_sds_secret_config is not None
            or common.validation_context_certificate_provider is not None
            or common.validation_context_certificate_provider_instance is not None
        ):
            return None
        return path, "no validation_context: client certificates are not checked against a CA"
    if vc.trust_chain_verification.name == "ACCEPT_UNTRUSTED":
        return f"{path}.trust_chain_verification", "trust_chain_verification is ACCEPT_UNTRUSTED"
    if (
        vc.trusted_ca is None
        and vc.custom_validator_config is None
        and vc.ca_certificate_provider_instance is None
        and common.combined_validation_context is None
    ):
        return f"{path}.trusted_ca", "the validation_context has no trusted_ca"
    return None


def _protocol_options(c: Any) -> Any:
    options = c.typed_extension_protocol_options or {}
    any_msg = options.get(e.HTTP_PROTOCOL_OPTIONS)
    return unpack(any_msg) if any_msg is not None else None


def _speaks_h2(c: Any, tls: bool) -> bool:
    if c.http2_protocol_options is not None:
        return True
    opts = _protocol_options(c)
    if opts is None:
        options = c.typed_extension_protocol_options or {}
        return e.HTTP_PROTOCOL_OPTIONS in options  # unknown shape: do not guess
    explicit = opts.explicit_http_config
    if explicit is not None:
        return explicit.http2_protocol_options is not None
    if opts.auto_config is not None:
        return tls  # ALPN picks h2 only over TLS
    return False


def _http2_only(c: Any) -> bool:
    if c.http2_protocol_options is not None:
        return True
    opts = _protocol_options(c)
    explicit = opts.explicit_http_config if opts is not None else None
    return explicit is not None and explicit.http2_protocol_options is not None


def _endpoint_hosts(la: Any) -> list[str]:
    hosts = []
    for locality in la.endpoints:
        for lb in locality.lb_endpoints:
            ep = lb.endpoint
            if ep is None or ep.address is None:
                continue
            sa = ep.address.socket_address
            if sa is not None:
                hosts.append(str(sa.address))
            # pipe and envoy_internal_address never leave the host
    return hosts


__all__ = ["AuthzFilter", "Doctor", "e_sort"]
