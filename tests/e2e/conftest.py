"""Fixtures for the end-to-end tests: one real stack (CA, upstream, extauthz, Envoy) per session.

The stack serves the test policy below, written to a temporary directory. Envoy missing is a
failure, not a skip: a missing dependency must never look like a green run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, _ROOT)

from extauthz.devstack.certs import CertificateAuthority, Credential  # noqa: E402
from extauthz.devstack.stack import DevStack, EnvoyNotFoundError, find_envoy  # noqa: E402

TRUST_DOMAIN = "demo.local"
ORDERS = "orders.demo.local"
CHECKOUT = "spiffe://demo.local/ns/shop/sa/checkout"
STRANGER = "spiffe://demo.local/ns/shop/sa/stranger"  # valid SPIFFE ID, no rule mentions it
LIMITED = "spiffe://demo.local/ns/batch/sa/exporter"

TEST_POLICY = f"""\
apiVersion: extauthz/v1
owner: team-e2e
service: orders
hosts: [{ORDERS}]
principals:
  - name: checkout
    spiffe: {CHECKOUT}
  - name: exporter
    spiffe: {LIMITED}
    limit: {{rate: 1, period: 10s, burst: 2}}
rules:
  - name: read-orders
    methods: [GET]
    path_prefix: /v1/orders
    allow: [checkout]
  - name: create-order
    methods: [POST]
    path: /v1/orders
    allow: [checkout]
  - name: export
    methods: [GET]
    path_prefix: /v1/export
    allow: [exporter]
"""


def _require_envoy() -> None:
    try:
        find_envoy()
    except EnvoyNotFoundError as exc:
        pytest.fail(f"{exc} (pip install 'extauthz[envoy]')", pytrace=False)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("policy")
    (d / "orders.yaml").write_text(TEST_POLICY, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, policy_dir: Path) -> Iterator[DevStack]:
    _require_envoy()
    s = DevStack(policy_dir, trust_domain=TRUST_DOMAIN, workdir=tmp_path_factory.mktemp("stack"))
    with s:
        yield s
    # SIGTERM must drain and exit cleanly: anything else is a bug worth a red test.
    assert s.exit_codes == {"envoy": 0, "extauthz": 0}, s.logs()


@pytest.fixture(scope="session")
def checkout(stack: DevStack) -> Credential:
    return stack.issue_svid(CHECKOUT)


@pytest.fixture(scope="session")
def stranger(stack: DevStack) -> Credential:
    return stack.issue_svid(STRANGER)


@pytest.fixture(scope="session")
def exporter(stack: DevStack) -> Credential:
    return stack.issue_svid(LIMITED)


@pytest.fixture(scope="session")
def dns_only(stack: DevStack) -> Credential:
    return stack.ca.issue_dns_only("legacy.demo.local")


@pytest.fixture(scope="session")
def foreign_checkout() -> Credential:
    """The checkout SPIFFE ID, but signed by a CA the sidecar does not trust."""
    return CertificateAuthority.create(TRUST_DOMAIN).issue_svid(CHECKOUT)
