"""Settings are validated in one place (`Settings` itself): every way of making them — flags,
environment, config file, or code — gets the same checks, and the `identity:` section comes
out typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.identity.resolver import IdentityConfig
from extauthz.settings import Settings, SettingsError, load_settings

TD = "prod.example"


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"decision_log_sample_allowed": 1.5}, "decision_log_sample_allowed"),
        ({"metrics_listen": "unix:/tmp/m.sock"}, "metrics_listen"),
        ({"metrics_listen": "nonsense"}, "metrics_listen"),
        ({"workers": 2, "listen": ("unix:/tmp/a.sock",)}, "workers"),
        ({"workers": 2, "listen": ("127.0.0.1:0",)}, "workers"),
        ({"tls_cert": "/c"}, "tls_key, tls_client_ca"),
        ({"tls_cert": "/c", "tls_key": "/k", "tls_client_ca": "/ca"}, "tls_allowed_clients"),
        ({"tls_cert": "/c", "tls_key": "/k", "tls_client_ca": "/ca",
          "tls_allowed_clients": ("spiffe://td/a*",)}, "tls_allowed_clients"),
        ({"identity": {"order": ["carrier-pigeon"]}}, "identity"),
        ({"identity": {"jwt": {"issuers": [{"issuer": "https://idp"}]}}}, "identity"),
        ({"identity": {"trust_domains": ["Not A Domain"]}}, "identity"),
        ({"identity": {"xfcc": {"headr": "x"}}}, "identity"),
        ({"trust_domains": ("bad domain",)}, "identity"),
        ({"principal_header": "traceparent"}, "principal_header"),
        ({"workers": 0}, "workers"),
    ],
)
def test_bad_settings_are_refused_however_they_are_made(fields: dict[str, object],
                                                        names: str) -> None:
    with pytest.raises(SettingsError, match=names):
        Settings(**fields)  # type: ignore[arg-type]
    flags = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in fields.items()
             if k != "identity"}
    if flags and "identity" not in fields:
        with pytest.raises(SettingsError, match=names):
            load_settings(flags, {})


def test_the_identity_section_comes_out_typed_with_the_flag_trust_domains_merged() -> None:
    s = load_settings({"trust_domains": TD}, {}, None)
    assert isinstance(s.identity_config, IdentityConfig)
    assert s.identity_config.trust_domains == frozenset({TD})
    typed = Settings(identity={"trust_domains": ["other.example"], "order": ["mtls"]},
                     trust_domains=(TD,)).identity_config
    assert typed.trust_domains == frozenset({TD, "other.example"}) and typed.order == ("mtls",)


def test_the_identity_section_from_a_config_file_is_typed_and_described(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("identity:\n  trust_domains: [prod.example]\n  xfcc:\n    max_bytes: 4096\n")
    s = load_settings({}, {}, cfg)
    assert s.identity_config.xfcc_max_bytes == 4096
    assert s.describe()["identity"] == {"trust_domains": [TD], "xfcc": {"max_bytes": 4096}}
    assert "identity_config" not in s.describe()


def test_good_tls_and_workers_settings_pass() -> None:
    s = Settings(tls_cert="/c", tls_key="/k", tls_client_ca="/ca",
                 tls_allowed_clients=("spiffe://td/ns/mesh/sa/*",), workers=2,
                 listen=("127.0.0.1:9191",), metrics_listen="127.0.0.1:0",
                 decision_log_sample_allowed=0.5)
    assert s.workers == 2
