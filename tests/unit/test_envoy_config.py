"""The typed Envoy config builder and `extauthz envoy-config` (pure: no Envoy binary here;
tests/integration/test_envoy_config_validate.py runs every variant through the real one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli.main import main
from extauthz.envoyconf.bootstrap import render
from extauthz.envoyconf.config import (
    EXT_AUTHZ_NAMESPACE,
    VARIANTS,
    SidecarConfig,
    render_variant,
    sidecar_bootstrap,
    to_plain,
)

ROOT = Path(__file__).resolve().parents[2]
EXT_AUTHZ_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"


def _hcm(doc: dict[str, Any]) -> dict[str, Any]:
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    typed: dict[str, Any] = chain["filters"][0]["typed_config"]
    return typed


def _authz(doc: dict[str, Any]) -> dict[str, Any]:
    [f] = [f for f in _hcm(doc)["http_filters"] if f["name"] == EXT_AUTHZ_NAMESPACE]
    typed: dict[str, Any] = f["typed_config"]
    return typed


def _clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_renders_parseable_yaml(variant: str) -> None:
    rendered = render_variant(variant, SidecarConfig(health_paths=("/healthz",)))  # type: ignore[arg-type]
    text = rendered.yaml()
    assert text.startswith("# ")
    assert yaml.safe_load(text) == rendered.data


def test_the_shipped_sidecar_is_the_sidecar_variant() -> None:
    shipped = yaml.safe_load((ROOT / "envoy" / "sidecar.yaml").read_text())
    assert shipped == render_variant("sidecar").data == render()


def test_filter_fails_closed_and_sends_no_body_by_default() -> None:
    authz = _authz(render_variant("sidecar").data)
    assert authz["@type"] == EXT_AUTHZ_TYPE
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": 503}
    assert authz["transport_api_version"] == "V3"
    assert authz["include_peer_certificate"] is True
    assert authz["grpc_service"] == {"envoy_grpc": {"cluster_name": "extauthz"}, "timeout": "0.25s"}
    assert "with_request_body" not in authz
    assert "metadata_context_namespaces" not in authz


def test_filter_options() -> None:
    doc = to_plain(
        sidecar_bootstrap(
            SidecarConfig(
                failure_mode_allow=True,
                authz_timeout_s=0.1,
                request_body_max_bytes=8192,
                metadata_namespaces=("envoy.filters.http.jwt_authn",),
            )
        )
    )
    authz = _authz(doc)
    assert authz["failure_mode_allow"] is True
    assert authz["grpc_service"]["timeout"] == "0.1s"
    assert authz["with_request_body"]["max_request_bytes"] == 8192
    assert authz["metadata_context_namespaces"] == ["envoy.filters.http.jwt_authn"]


def test_filter_variant_is_the_sidecar_chain() -> None:
    data = render_variant("filter").data
    assert data["http_filters"] == _hcm(render())["http_filters"]
    names = [f["name"] for f in data["http_filters"]]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]


def test_cluster_is_http2_health_checked_and_circuit_broken() -> None:
    [cluster] = render_variant("cluster").data["clusters"]
    assert cluster == _clusters(render())["extauthz"]
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    [thresholds] = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_requests"] == 4096 and thresholds["max_pending_requests"] == 1024
    assert cluster["type"] == "STATIC"
    assert "transport_socket" not in cluster


def test_cluster_address_kinds() -> None:
    unix = _clusters(render(SidecarConfig(extauthz="unix:/run/extauthz/authz.sock")))["extauthz"]
    [ep] = unix["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"] == {"pipe": {"path": "/run/extauthz/authz.sock"}}
    assert unix["type"] == "STATIC"
    dns = _clusters(render(SidecarConfig(extauthz="extauthz.authz.svc:9191", extauthz_tls=True)))[
        "extauthz"
    ]
    assert dns["type"] == "STRICT_DNS"


def test_cluster_mtls_to_extauthz() -> None:
    spiffe = "spiffe://cluster.local/ns/authz/sa/extauthz"
    cluster = _clusters(render(SidecarConfig(extauthz_tls=True, extauthz_spiffe_id=spiffe)))[
        "extauthz"
    ]
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    common = tls["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"].endswith("server.crt")
    [san] = common["validation_context"]["match_typed_subject_alt_names"]
    assert san == {"san_type": "URI", "matcher": {"exact": spiffe}}


def test_sds_from_the_spire_agent() -> None:
    config = SidecarConfig(
        sds_socket="unix:/run/spire/sockets/agent.sock",
        extauthz_tls=True,
        extauthz_spiffe_id="spiffe://cluster.local/ns/authz/sa/extauthz",
    )
    doc = render(config)
    clusters = _clusters(doc)
    [ep] = clusters["sds_server"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert ep["endpoint"]["address"] == {"pipe": {"path": "/run/spire/sockets/agent.sock"}}
    chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
    common = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert "tls_certificates" not in common and "validation_context" not in common
    assert common["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    assert common["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    upstream = clusters["extauthz"]["transport_socket"]["typed_config"]["common_tls_context"]
    combined = upstream["combined_validation_context"]
    assert combined["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    [san] = combined["default_validation_context"]["match_typed_subject_alt_names"]
    assert san["matcher"] == {"exact": "spiffe://cluster.local/ns/authz/sa/extauthz"}
    with pytest.raises(ValueError):
        SidecarConfig(sds_socket="/run/spire/agent.sock")


def test_routes_health_paths_bypass_and_route_names_reach_extauthz() -> None:
    data = render_variant("per-route", SidecarConfig(health_paths=("/healthz", "/ready"))).data
    health, ready, default = data["routes"]
    for route, path in ((health, "/healthz"), (ready, "/ready")):
        assert route["match"] == {"path": path}  # exact: /healthz/x is authorized as usual
        assert route["typed_per_filter_config"][EXT_AUTHZ_NAMESPACE]["disabled"] is True
    assert default["match"] == {"prefix": "/"}
    settings = default["typed_per_filter_config"][EXT_AUTHZ_NAMESPACE]["check_settings"]
    assert settings == {"context_extensions": {"route": "default"}}


def test_no_route_bypasses_authz_by_default() -> None:
    routes = _hcm(render())["route_config"]["virtual_hosts"][0]["routes"]
    assert len(routes) == 1
    assert "disabled" not in routes[0]["typed_per_filter_config"][EXT_AUTHZ_NAMESPACE]


def test_access_log_and_tracing_carry_the_principal() -> None:
    hcm = _hcm(render())
    fmt = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert fmt["principal"] == "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:principal)%"
    assert fmt["rule"] == "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:rule)%"
    assert fmt["authz_reason"] == "%RESP(x-extauthz-reason)%"
    tags = {t["tag"]: t for t in hcm["tracing"]["custom_tags"]}
    principal = tags["extauthz.principal"]["metadata"]
    assert principal["kind"] == {"request": {}}
    assert principal["metadata_key"] == {
        "key": "envoy.filters.http.ext_authz",
        "path": [{"key": "principal"}],
    }


def test_network_variant() -> None:
    doc = render_variant("network", SidecarConfig(listen_port=15432, upstream_port=5432)).data
    [listener] = doc["static_resources"]["listeners"]
    chain = listener["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True
    authz, proxy = chain["filters"]
    assert authz["name"] == "envoy.filters.network.ext_authz"
    cfg = authz["typed_config"]
    assert cfg["failure_mode_allow"] is False and cfg["include_peer_certificate"] is True
    assert cfg["include_tls_session"] is True and cfg["transport_api_version"] == "V3"
    assert proxy["typed_config"]["cluster"] == "local_service"
    log = proxy["typed_config"]["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert log["principal"] == "%DYNAMIC_METADATA(envoy.filters.network.ext_authz:principal)%"


def test_typed_round_trip_checks_every_field_name() -> None:
    # Parsing the plain form back into typed messages rejects any field Envoy does not know.
    from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

    for variant in ("sidecar", "network"):
        data = render_variant(variant).data  # type: ignore[arg-type]
        assert to_plain(Bootstrap.from_dict(data)) == data


@pytest.mark.parametrize(
    "kwargs",
    [
        {"extauthz": "localhost"},
        {"extauthz": "unix:relative.sock"},
        {"health_paths": ("healthz",)},
        {"health_paths": ("/a?b",)},
        {"route_name": "has space"},
        {"authz_timeout_s": 0},
        {"request_body_max_bytes": -1},
        {"extauthz_spiffe_id": "extauthz"},
        {"extauthz_spiffe_id": "spiffe://cluster.local/ns/authz/sa/extauthz"},  # without TLS
        {"extauthz": "unix:/run/extauthz/authz.sock", "extauthz_tls": True},  # plaintext socket
        {"principal_header": "x caller"},
        {"principal_header": ":authority"},
        {"principal_header": "x-forwarded-client-cert"},
        {"principal_header": "x-extauthz-reason"},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SidecarConfig(**kwargs)


# -- the command line ------------------------------------------------------------------------


def test_cli_defaults_mirror_the_builder() -> None:
    import dataclasses

    from extauthz.cli import envoy as cli_envoy
    from extauthz.envoyconf import config as envoy_config

    assert cli_envoy.VARIANTS == envoy_config.VARIANTS
    assert cli_envoy.TRANSPORTS == envoy_config.TRANSPORTS
    assert cli_envoy.DEFAULT_CERTS_DIR == envoy_config.DEFAULT_CERTS_DIR
    builder = SidecarConfig()
    for f in dataclasses.fields(cli_envoy.DEFAULTS):
        assert getattr(cli_envoy.DEFAULTS, f.name) == getattr(builder, f.name), f.name


def test_registering_the_command_does_not_import_envoy_data_plane() -> None:
    import subprocess
    import sys

    code = (
        "import sys, argparse; from extauthz.cli import envoy as cli_envoy; "
        "p = argparse.ArgumentParser(); cli_envoy.register(p.add_subparsers()); "
        "assert not any(m.startswith('envoy_data_plane') for m in sys.modules), 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_cli_writes_the_sidecar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envoy.yaml"
    code = main(
        [
            "envoy-config",
            "--extauthz", "unix:/run/extauthz/authz.sock",
            "--upstream", "127.0.0.1:8081",
            "--listen-port", "15000",
            "--certs-dir", "/run/svid",
            "--timeout", "200ms",
            "--health-path", "/healthz",
            "-o", str(out),
        ]
    )
    assert code == 0
    doc = yaml.safe_load(out.read_text())
    assert _authz(doc)["grpc_service"]["timeout"] == "0.2s"
    listener = doc["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 15000
    tls = listener["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["validation_context"]["trusted_ca"]["filename"] == "/run/svid/ca.crt"
    upstream = _clusters(doc)["local_service"]["load_assignment"]["endpoints"][0]
    assert upstream["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] == 8081
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_variants_to_stdout(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy-config", "--variant", variant]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == render_variant(variant).data  # type: ignore[arg-type]


def test_cli_warns_about_failing_open(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy-config", "--failure-mode-allow", "true", "--variant", "filter"]) == 0
    captured = capsys.readouterr()
    assert "WARNING" in captured.err
    assert "failure_mode_allow: true" in captured.out


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "soon"],
        ["--failure-mode-allow", "maybe"],
        ["--upstream", "nohost"],
        ["--variant", "gateway"],
    ],
)
def test_cli_rejects_bad_flags(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["envoy-config", *args])
    assert info.value.code == 2


def test_cli_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy-config", "--extauthz", "nowhere"]) == 2
    assert "HOST:PORT or unix:/path" in capsys.readouterr().err


# -- the authz channel: never plaintext across the network -----------------------------------


REMOTE = ["10.1.2.3:9191", "extauthz.authz.svc.cluster.local:9191", "0.0.0.0:9191", "[2001:db8::1]:9191"]
LOCAL = ["127.0.0.1:9191", "127.0.0.53:9191", "[::1]:9191", "localhost:9191"]


@pytest.mark.parametrize("target", REMOTE)
def test_non_loopback_plaintext_authz_is_refused(target: str) -> None:
    with pytest.raises(ValueError, match="plaintext") as info:
        SidecarConfig(extauthz=target)
    assert "--extauthz-tls" in str(info.value) and "unix:/path" in str(info.value)
    # With mTLS to extauthz the same address is fine.
    spiffe = "spiffe://cluster.local/ns/authz/sa/extauthz"
    cluster = render_variant(
        "cluster", SidecarConfig(extauthz=target, extauthz_tls=True, extauthz_spiffe_id=spiffe)
    ).data["clusters"][0]
    assert cluster["transport_socket"]["typed_config"]["@type"].endswith("UpstreamTlsContext")


@pytest.mark.parametrize("target", REMOTE)
def test_cli_refuses_non_loopback_plaintext(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy-config", "--extauthz", target]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "plaintext" in captured.err and "--extauthz-tls" in captured.err
    args = ["envoy-config", "--extauthz", target, "--extauthz-tls"]
    assert main([*args, "--extauthz-spiffe-id", "spiffe://td/ns/authz/sa/extauthz"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert main(args) == 0  # no SAN check: allowed, but said out loud
    assert "--extauthz-spiffe-id" in capsys.readouterr().err


def test_bootstrap_script_refuses_non_loopback_plaintext(capsys: pytest.CaptureFixture[str]) -> None:
    from extauthz.envoyconf.bootstrap import main as bootstrap_main

    assert bootstrap_main(["--extauthz", "10.1.2.3:9191"]) == 2
    assert "plaintext" in capsys.readouterr().err


@pytest.mark.parametrize("target", LOCAL)
def test_loopback_plaintext_authz_is_fine(target: str) -> None:
    cluster = render_variant("cluster", SidecarConfig(extauthz=target)).data["clusters"][0]
    assert "transport_socket" not in cluster


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost", "LOCALHOST", "a.localhost",
     "ip6-localhost", "10.0.0.1", "0.0.0.0", "::", "example.com", "localhost.example.com"],
)
def test_loopback_agrees_with_the_doctor(host: str) -> None:
    from extauthz.envoyconf.config import is_loopback_host
    from extauthz.tools.doctor.envoy import is_loopback

    assert is_loopback_host(host) == is_loopback(host)


# -- the principal header --------------------------------------------------------------------


def _stripped(data: dict[str, Any]) -> list[str]:
    [strip] = [f for f in data["http_filters"] if f["name"] == "envoy.filters.http.header_mutation"]
    return [m["remove"] for m in strip["typed_config"]["mutations"]["request_mutations"]]


def test_strip_filter_removes_the_default_headers() -> None:
    assert _stripped(render_variant("filter").data) == ["x-extauthz-principal", "x-extauthz-rule"]
    assert _stripped(render_variant("filter", SidecarConfig(principal_header="")).data) == [
        "x-extauthz-principal",
        "x-extauthz-rule",
    ]


def test_renamed_principal_header_is_stripped_too() -> None:
    data = render_variant("filter", SidecarConfig(principal_header="X-Caller-Identity")).data
    assert _stripped(data) == ["x-caller-identity", "x-extauthz-principal", "x-extauthz-rule"]
    sidecar = render_variant("sidecar", SidecarConfig(principal_header="x-caller-identity")).data
    assert _hcm(sidecar)["http_filters"] == data["http_filters"]


def test_cli_principal_header(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envoy-config", "--variant", "filter", "--principal-header", "x-caller"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert _stripped(data) == ["x-caller", "x-extauthz-principal", "x-extauthz-rule"]
    assert main(["envoy-config", "--principal-header", "authorization"]) == 2
    assert "principal header" in capsys.readouterr().err


def test_principal_header_default_matches_the_server() -> None:
    from extauthz.settings import Settings
    from extauthz.transport.grpc_proto import ResponseOptions

    assert SidecarConfig().principal_header == Settings().principal_header
    assert SidecarConfig().principal_header == ResponseOptions().principal_header
    assert set(SidecarConfig().trusted_headers) == set(ResponseOptions().strip_headers)
