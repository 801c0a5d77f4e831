"""Every variant `extauthz envoy-config` renders is accepted by the real Envoy
(`envoy --mode validate`) and comes out clean under `extauthz doctor`. The complete bootstraps
(sidecar, network) are checked as they are; the pieces (filter, cluster, per-route) are pasted
into the default sidecar in place of its own, which is exactly how an operator uses them.
Envoy missing is a failure, not a skip.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.envoyconf.config import (
    VARIANTS,
    SidecarConfig,
    Variant,
    config_with_certs_dir,
    render_variant,
)

from .conftest import envoy_validate


def _assert_valid(envoy_bin: str, path: Path) -> None:
    proc = envoy_validate(envoy_bin, path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in out, f"{path}:\n{path.read_text()}\n{out}"


def as_bootstrap(variant: Variant, config: SidecarConfig) -> dict[str, Any]:
    """A complete bootstrap containing the variant's output."""
    rendered = yaml.safe_load(render_variant(variant, config).yaml())
    if variant in ("sidecar", "network"):
        return dict(rendered)
    doc = copy.deepcopy(render_variant("sidecar", config).data)
    listener = doc["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    if variant == "filter":
        hcm["http_filters"] = rendered["http_filters"]
    elif variant == "per-route":
        hcm["route_config"]["virtual_hosts"][0]["routes"] = rendered["routes"]
    elif variant == "cluster":
        others = [c for c in doc["static_resources"]["clusters"] if c["name"] != "extauthz"]
        doc["static_resources"]["clusters"] = rendered["clusters"] + others
    return doc


OPTIONS = {
    "defaults": SidecarConfig(),
    "unix-health-paths": SidecarConfig(
        extauthz="unix:/run/extauthz/authz.sock", health_paths=("/healthz", "/readyz")
    ),
    "dns-mtls-to-extauthz": SidecarConfig(
        extauthz="extauthz.authz.svc.cluster.local:9191",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    ),
    "spire-sds": SidecarConfig(
        sds_socket="unix:/run/spire/sockets/agent.sock",
        extauthz="extauthz.authz.svc:9191",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    ),
    "remote-ip-mtls-to-extauthz": SidecarConfig(
        extauthz="10.1.2.3:9191",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    ),
    "renamed-principal-header": SidecarConfig(principal_header="x-caller-identity"),
    "grpc-streams-for-workers": SidecarConfig(authz_max_concurrent_streams=8),
    "body-metadata-file-log": SidecarConfig(
        request_body_max_bytes=4096,
        metadata_namespaces=("envoy.filters.http.jwt_authn",),
        access_log_path="/dev/null",
        authz_timeout_s=0.1,
        route_name="orders-api",
        listen_port=0,
        admin_port=0,
    ),
}


# The HTTP transport (`--transport http`): every variant but the network one (gRPC only).
HTTP_OPTIONS = {
    "http-defaults": SidecarConfig(transport="http"),
    "http-unix-health-paths": SidecarConfig(
        transport="http", extauthz="unix:/run/extauthz/authz.sock", health_paths=("/healthz",)
    ),
    "http-mtls-to-extauthz": SidecarConfig(
        transport="http",
        extauthz="extauthz.authz.svc.cluster.local:9292",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    ),
    "http-spire-sds": SidecarConfig(
        transport="http",
        sds_socket="unix:/run/spire/sockets/agent.sock",
        extauthz="extauthz.authz.svc:9292",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    ),
    "http-renamed-header-policy-headers": SidecarConfig(
        transport="http", principal_header="x-caller-identity",
        authz_headers=("x-tenant", "x-debug"), access_log_path="/dev/null",
        route_name="orders-api", listen_port=0, admin_port=0,
    ),
}
HTTP_VARIANTS = [v for v in VARIANTS if v != "network"]


@pytest.mark.parametrize("variant", HTTP_VARIANTS)
@pytest.mark.parametrize("option", sorted(HTTP_OPTIONS))
def test_http_transport_variant_validates(
    envoy_bin: str, certs_dir: Path, tmp_path: Path, variant: Variant, option: str
) -> None:
    config = config_with_certs_dir(str(certs_dir), HTTP_OPTIONS[option])
    path = tmp_path / f"{variant}-{option}.yaml"
    path.write_text(yaml.safe_dump(as_bootstrap(variant, config), sort_keys=False))
    _assert_valid(envoy_bin, path)


def test_http_transport_has_no_network_variant_and_refuses_grpc_only_settings() -> None:
    with pytest.raises(ValueError, match="speaks gRPC only"):
        render_variant("network", SidecarConfig(transport="http"))
    with pytest.raises(ValueError, match="no request body"):
        SidecarConfig(transport="http", request_body_max_bytes=10)
    with pytest.raises(ValueError, match="only over gRPC"):
        SidecarConfig(transport="http", metadata_namespaces=("envoy.filters.http.jwt_authn",))


def test_http_transport_sidecar_sends_the_sanitized_xfcc_and_strips_trusted_headers() -> None:
    doc = render_variant("sidecar", SidecarConfig(transport="http")).data
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    strip, authz, _router = hcm["http_filters"]
    assert [m["remove"] for m in strip["typed_config"]["mutations"]["request_mutations"]] == [
        "x-extauthz-principal", "x-extauthz-rule"]
    config = authz["typed_config"]
    sent = [p["exact"] for p in config["allowed_headers"]["patterns"]]
    assert "x-forwarded-client-cert" in sent and "authorization" in sent
    response = config["http_service"]["authorization_response"]
    meta = [p["exact"] for p in response["dynamic_metadata_from_headers"]["patterns"]]
    assert meta == ["principal", "identity_source", "rule", "decision", "reason",
                    "policy_version"]
    assert "include_peer_certificate" not in config and "grpc_service" not in config
    [cluster] = [c for c in doc["static_resources"]["clusters"] if c["name"] == "extauthz"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in options["explicit_http_config"]
    assert "tcp_health_check" in cluster["health_checks"][0]


def test_cli_renders_the_http_transport_and_it_validates(
    envoy_bin: str, certs_dir: Path, tmp_path: Path
) -> None:
    from extauthz.cli.main import main

    out = tmp_path / "http.yaml"
    assert main(["envoy-config", "--transport", "http", "--authz-header", "X-Tenant",
                 "--certs-dir", str(certs_dir), "-o", str(out)]) == 0
    _assert_valid(envoy_bin, out)
    assert "exact: x-tenant" in out.read_text()
    assert main(["envoy-config", "--transport", "http", "--variant", "network",
                 "-o", str(tmp_path / "n.yaml")]) == 2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_variant_validates(
    envoy_bin: str, certs_dir: Path, tmp_path: Path, variant: Variant, option: str
) -> None:
    config = config_with_certs_dir(str(certs_dir), OPTIONS[option])
    path = tmp_path / f"{variant}-{option}.yaml"
    path.write_text(yaml.safe_dump(as_bootstrap(variant, config), sort_keys=False))
    _assert_valid(envoy_bin, path)


def test_cli_output_validates(envoy_bin: str, certs_dir: Path, tmp_path: Path) -> None:
    from extauthz.cli.main import main

    for variant in ("sidecar", "network"):
        out = tmp_path / f"{variant}.yaml"
        args = ["envoy-config", "--variant", variant, "--certs-dir", str(certs_dir), "-o", str(out)]
        assert main(args) == 0
        _assert_valid(envoy_bin, out)


def test_validation_is_not_a_rubber_stamp(envoy_bin: str, certs_dir: Path, tmp_path: Path) -> None:
    config = config_with_certs_dir(str(certs_dir))
    doc = as_bootstrap("network", config)
    authz = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz["typed_config"]["transport_api_version"] = "V7"
    bad = tmp_path / "bad-network.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert envoy_validate(envoy_bin, bad).returncode != 0
    doc = as_bootstrap("per-route", config)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] = "sometimes"
    bad.write_text(yaml.safe_dump(doc))
    assert envoy_validate(envoy_bin, bad).returncode != 0


# -- `extauthz doctor` on every variant --------------------------------------------------------

EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
DOCTOR_VARIANTS = list(VARIANTS)  # the TCP (network) variant included


@pytest.mark.parametrize("variant", DOCTOR_VARIANTS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_variant_is_clean_under_doctor(variant: Variant, option: str) -> None:
    from extauthz.tools.doctor import PolicyFacts, diagnose

    doc = as_bootstrap(variant, OPTIONS[option])
    for policy in (None, PolicyFacts(("orders.demo.local",), matches_on_path=True)):
        findings = [(f.code, f.path, f.message) for f in diagnose(doc, policy)]
        # Sending the body is an opt-in extauthz never reads: the doctor says so, nothing else.
        expected = ({"ext_authz.request_body_buffered"}
                    if OPTIONS[option].request_body_max_bytes and variant != "network" else set())
        assert {code for code, _, _ in findings} == expected, (
            f"{variant}/{option} policy={policy}:\n{findings}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_http_authz_filter_answers_503_on_error(variant: Variant, option: str) -> None:
    doc = as_bootstrap(variant, OPTIONS[option])
    found: list[dict[str, Any]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("@type") == EXT_AUTHZ_TYPE:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    if variant == "network":
        # TCP: no HTTP status to answer; an error closes the connection (fail closed).
        assert found == []
        authz = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        assert authz["typed_config"]["failure_mode_allow"] is False
        return
    assert len(found) == 1, found
    assert found[0]["status_on_error"] == {"code": 503}
    assert found[0]["failure_mode_allow"] is False


def test_cli_refuses_what_the_doctor_flags(tmp_path: Path) -> None:
    """The doctor author's report: `--extauthz 10.1.2.3:9191` used to render a plaintext gRPC
    cluster to a non-loopback address (`authz_cluster.plaintext`). The renderer now refuses it;
    the doctor still flags such a cluster when someone writes it by hand."""
    from extauthz.cli.main import main
    from extauthz.tools.doctor import diagnose

    out = tmp_path / "remote.yaml"
    assert main(["envoy-config", "--extauthz", "10.1.2.3:9191", "-o", str(out)]) == 2
    assert not out.exists()
    doc = copy.deepcopy(render_variant("sidecar").data)
    [cluster] = [c for c in doc["static_resources"]["clusters"] if c["name"] == "extauthz"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["address"] = "10.1.2.3"
    assert [f.code for f in diagnose(doc)] == ["authz_cluster.plaintext"]


@pytest.mark.parametrize("variant", HTTP_VARIANTS)
@pytest.mark.parametrize("option", sorted(HTTP_OPTIONS))
def test_http_transport_variant_is_clean_under_doctor(variant: Variant, option: str) -> None:
    from extauthz.tools.doctor import PolicyFacts, diagnose

    doc = as_bootstrap(variant, HTTP_OPTIONS[option])
    for policy in (None, PolicyFacts(("orders.demo.local",), matches_on_path=True)):
        findings = [(f.code, f.path, f.message) for f in diagnose(doc, policy)]
        assert findings == [], f"{variant}/{option} policy={policy}:\n{findings}"
