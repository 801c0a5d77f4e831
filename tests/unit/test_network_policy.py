"""Connection rules for Envoy's network (TCP) ext_authz filter: parsing, evaluation, and the
CheckRequest/CheckResponse shapes of a network check."""

from __future__ import annotations

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ea
from google.rpc import code_pb2

from extauthz.model import Decision, Identity, IdentitySource, Outcome, Reason
from extauthz.policy.compiled import CompiledPolicy, compile_policy
from extauthz.policy.document import PolicyDocument, PolicyError, load_yaml, parse_document
from extauthz.transport.grpc_proto import is_network_check, to_network_response, to_request

CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"
BATCH = "spiffe://demo.local/ns/batch/sa/exporter"


def _identity(principal: str) -> Identity:
    return Identity(principal, IdentitySource.MTLS, "demo.local")


def _doc(connections: object, principals: str = "", source: str = "a.yaml") -> PolicyDocument:
    text = (
        "apiVersion: extauthz/v1\nowner: team-db\nservice: db\nhosts: [db.demo.local]\n"
        f"principals:\n{principals or '  []'}\nconnections: {connections}\n"
    )
    return parse_document(load_yaml(text, source), source)


A_YAML = """\
apiVersion: extauthz/v1
owner: team-db
service: db
hosts: [db.demo.local]
principals:
  - name: checkout
    spiffe: spiffe://demo.local/ns/shop/sa/checkout
connections:
  - name: db
    ports: [5432]
    allow: [checkout]
"""
B_YAML = """\
apiVersion: extauthz/v1
owner: team-cache
service: cache
hosts: [cache.demo.local]
connections:
  - name: cache
    ports: [6379]
    allow: ["*"]
  - name: cache-admin
    ports: [6380]
    allow: [ghost]
"""


def _policy(*docs: tuple[str, str]) -> CompiledPolicy:
    return compile_policy([parse_document(load_yaml(text, name), name) for name, text in docs], "v1")


POLICY = compile_policy([parse_document({
    "apiVersion": "extauthz/v1", "owner": "team-db", "service": "db", "hosts": ["db.demo.local"],
    "principals": [{"name": "checkout", "spiffe": CHECKOUT}],
    "connections": [
        {"name": "db", "ports": [5432], "allow": ["checkout"]},
        {"name": "db-batch", "ports": 5432, "sni": ["DB.demo.local"],
         "allow": ["spiffe://demo.local/ns/batch/sa/*"]},
        {"name": "cache", "ports": [6379, 6380], "allow": ["*"]},
    ],
}, "db.yaml")], "v1")
TABLE = POLICY.connections


def test_an_unknown_principal_in_the_second_file_is_reported_in_that_file_with_its_line() -> None:
    with pytest.raises(PolicyError) as info:
        _policy(("a.yaml", A_YAML), ("b.yaml", B_YAML))
    err = info.value
    assert (err.source, err.line) == ("b.yaml", 9), str(err)  # the rule's line
    assert "ghost" in err.message and str(err).startswith("b.yaml: ")


def test_a_connection_rule_name_reused_in_another_file_names_both_files_and_the_line() -> None:
    dup = B_YAML.replace("name: cache-admin", "name: db").replace("[ghost]", '["*"]')
    with pytest.raises(PolicyError) as info:
        _policy(("a.yaml", A_YAML), ("b.yaml", dup))
    assert (info.value.source, info.value.line) == ("b.yaml", 9)
    assert "already used in a.yaml" in info.value.message


def test_network_checks_use_the_table_built_at_load_and_never_rebuild_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from extauthz.decide.cache import DecisionCache
    from extauthz.decide.pipeline import Authorizer
    from extauthz.model import Request
    from extauthz.policy import compiled as compiled_module

    policy = _policy(("a.yaml", A_YAML))

    def rebuilt(*_: object) -> None:
        raise AssertionError("the connection table was built again after load")

    monkeypatch.setattr(compiled_module, "compile_connections", rebuilt)

    class Holder:
        current = policy

    class Caller:
        def resolve(self, _request: Request, _now: float) -> Identity:
            return _identity(CHECKOUT)

    authz = Authorizer(Holder(), Caller(), DecisionCache(0, 0, lambda: 0.0), lambda: 0.0)
    for port, allowed in ((5432, True), (5432, True), (6379, False)):
        request = Request(is_http=False, destination_port=port, source_principal=CHECKOUT)
        assert asyncio.run(authz.check(request)).decision.allowed is allowed
    missing = asyncio.run(authz.check(Request(is_http=False, source_principal=CHECKOUT)))
    assert missing.decision.reason is Reason.MALFORMED_REQUEST  # no destination port


def test_a_limit_the_limiter_cannot_represent_fails_the_load_with_its_line() -> None:
    text = A_YAML.replace("    spiffe: spiffe://demo.local/ns/shop/sa/checkout\n",
                          "    spiffe: spiffe://demo.local/ns/shop/sa/checkout\n"
                          f"    limit: {{rate: 1, period: {'9' * 400}s}}\n")
    with pytest.raises(PolicyError) as info:
        _policy(("a.yaml", text))
    assert (info.value.source, info.value.line) == ("a.yaml", 6)
    assert "period" in info.value.message


def test_allowed_by_name() -> None:
    d = TABLE.evaluate(_identity(CHECKOUT), 5432, "", "v1")
    assert (d.outcome, d.reason, d.rule, d.policy_version) == (Outcome.ALLOW, Reason.ALLOWED, "db", "v1")


def test_sni_scoped_pattern() -> None:
    assert TABLE.evaluate(_identity(BATCH), 5432, "db.demo.local", "v").rule == "db-batch"
    denied = TABLE.evaluate(_identity(BATCH), 5432, "other.demo.local", "v")
    assert (denied.outcome, denied.reason) == (Outcome.FORBIDDEN, Reason.PRINCIPAL_NOT_ALLOWED)


def test_unknown_port_is_no_matching_rule() -> None:
    d = TABLE.evaluate(_identity(CHECKOUT), 9999, "", "v")
    assert (d.outcome, d.reason) == (Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE)


def test_anyone() -> None:
    assert TABLE.evaluate(_identity(BATCH), 6380, "", "v").allowed


@pytest.mark.parametrize(
    ("raw", "field", "line"),
    [
        ('"x"', "connections", 7),
        ('\n  - {name: a, ports: [0], allow: ["*"]}', "connections[0].ports", 8),
        ('\n  - {name: a, ports: [true], allow: ["*"]}', "connections[0].ports", 8),
        ("\n  - {name: a, ports: [1]}", "connections[0].allow", 8),
        ('\n  - {name: A, ports: [1], allow: ["*"]}', "connections[0].name", 8),
        ('\n  - {name: a, ports: [1], allow: ["*"], hosts: [x]}', "connections[0].hosts", 8),
        ('\n  - {name: a, ports: [1], allow: ["spiffe://td/a*"]}', "connections[0].allow", 8),
        ('\n  - {name: a, ports: [1], allow: ["*"]}\n  - {name: a, ports: [2], allow: ["*"]}',
         "connections[1].name", 9),
    ],
)
def test_bad_rules_name_the_file_the_field_and_the_line(raw: str, field: str, line: int) -> None:
    with pytest.raises(PolicyError) as info:
        _doc(raw, source="c.yaml")
    assert (info.value.source, info.value.field_path, info.value.line) == ("c.yaml", field, line)


def test_connection_rules_and_http_rules_share_one_name_syntax() -> None:
    """The rule-name check is the document parser's, so the same names are refused."""
    for bad in ("A", "-a", "a" * 65, "a b"):
        with pytest.raises(PolicyError, match="lowercase letters"):
            _doc(f'\n  - {{name: "{bad}", ports: [1], allow: ["*"]}}')


def test_unknown_principal_name_is_refused_at_compile() -> None:
    with pytest.raises(PolicyError, match="ghost"):
        compile_policy([_doc('\n  - {name: a, ports: [1], allow: [ghost]}')], "v1")


def test_a_jwt_principal_cannot_open_connections() -> None:
    jwt = "  - {name: batch, jwt: {issuer: https://idp, subject: batch}}"
    with pytest.raises(PolicyError, match="without a SPIFFE ID"):
        compile_policy([_doc('\n  - {name: a, ports: [1], allow: [batch]}', jwt)], "v1")


def test_network_check_request_and_response() -> None:
    check = ea.CheckRequest()
    attrs = check.attributes
    attrs.source.principal = CHECKOUT
    attrs.source.address.socket_address.address = "10.0.0.7"
    attrs.destination.address.socket_address.address = "10.0.0.9"
    attrs.destination.address.socket_address.port_value = 5432
    attrs.tls_session.sni = "db.demo.local"
    request = to_request(check)
    assert not request.is_http and is_network_check(request)
    assert not is_network_check(to_request(ea.CheckRequest()))  # empty: HTTP-shaped denial
    assert request.host == "db.demo.local"
    assert (request.destination_port, request.destination_address) == (5432, "10.0.0.9")
    assert request.source_principal == CHECKOUT and request.source_address == "10.0.0.7"

    ok = to_network_response(Decision(Outcome.ALLOW, Reason.ALLOWED, rule="db",
                                      identity=_identity(CHECKOUT)))
    assert ok.status.code == code_pb2.OK
    assert not ok.HasField("ok_response") and not ok.HasField("denied_response")
    assert ok.dynamic_metadata["principal"] == CHECKOUT
    denied = to_network_response(Decision(Outcome.FORBIDDEN, Reason.NO_MATCHING_RULE))
    assert denied.status.code == code_pb2.PERMISSION_DENIED
    assert not denied.HasField("denied_response")
