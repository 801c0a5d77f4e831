"""Every shell block in README.md and docs/*.md is either run by a test or skipped for a
stated reason: a new or edited block fails here until someone decides which."""

from __future__ import annotations

from tests.docblocks import REPO, all_blocks

# (doc, first command) -> the test that runs the whole block against real output.
RUN = {
    ("README.md", "extauthz envoy-config --transport http --extauthz unix:/run/extauthz/authz.sock "
     "--certs-dir /run/svid -o envoy.yaml"): "tests/integration/test_doc_commands.py",
    ("docs/operations.md", "extauthz envoy-config                                   "
     "# complete mTLS sidecar bootstrap"): "tests/integration/test_doc_commands.py",
    ("docs/operations.md", "extauthz serve --policy /etc/extauthz/policy --listen 0.0.0.0:9191 "
     "--tls-cert /run/svid/svid.pem --tls-key /run/svid/svid.key --tls-client-ca "
     "/run/svid/bundle.pem --tls-allowed-clients 'spiffe://prod.example/ns/mesh/sa/envoy,"
     "spiffe://prod.example/ns/gateways/sa/*'"): "tests/integration/test_doc_commands.py",
    ("docs/operations.md", "extauthz serve --policy /etc/extauthz/policy --http-listen "
     "unix:/run/extauthz/authz.sock"): "tests/integration/test_doc_commands.py",
    ("docs/troubleshooting.md", "curl -si --cert client.crt --key client.key --cacert ca.crt "
     "https://orders.mesh.local:10000/v1/orders"): "tests/e2e/test_troubleshooting_walkthrough.py",
    ("docs/troubleshooting.md", "grep '\"principal\":\"spiffe://prod.example/ns/shop/sa/cart\"' "
     "decisions.log | tail -5"): "tests/e2e/test_troubleshooting_walkthrough.py",
    ("docs/troubleshooting.md", "jq -c 'select(.principal==\"spiffe://prod.example/ns/shop/sa/"
     "cart\") | {time, status, reason, rule, path}' decisions.log"):
        "tests/e2e/test_troubleshooting_walkthrough.py",
    ("docs/troubleshooting.md", "extauthz check --policy ./policy --principal spiffe://"
     "prod.example/ns/shop/sa/cart --method GET --host orders.mesh.local --path /v1/orders "
     "--explain"): "tests/e2e/test_troubleshooting_walkthrough.py",
    ("docs/observability.md", "jq -c 'select(.principal==\"spiffe://demo.local/ns/shop/sa/"
     "checkout\" and .decision==\"deny\")' decisions.log"):
        "tests/e2e/test_troubleshooting_walkthrough.py",
    ("docs/doctor.md", "extauthz doctor --admin http://127.0.0.1:9901 --policy policies/"):
        "tests/e2e/test_troubleshooting_walkthrough.py",
    # Console transcripts: every command run, its output compared line by line (the commands
    # of an illustration that needs files the repository does not have are skipped there,
    # each with its reason, in tests/integration/test_doc_commands.py).
    ("docs/policy.md", "extauthz validate bad/"): "tests/integration/test_doc_commands.py",
    ("docs/policy.md", "extauthz check --policy policy --host orders.mesh.local --principal "
     "checkout --method GET --path /v1/orders/42"): "tests/integration/test_doc_commands.py",
    ("docs/policy.md", "extauthz test policy/"): "tests/integration/test_doc_commands.py",
}

# (doc, first command) -> why no test runs it.
SKIPPED = {
    ("README.md", "bash scripts/demo.sh    # run it: real Envoy + extauthz + a sample upstream, "
     "real mTLS calls"): "scripts/test.sh is what CI runs; demo.sh builds a venv then runs "
     "`extauthz demo`, whose stack (DevStack) every e2e test starts",
    ("docs/doctor.md", "kubectl port-forward -n shop deploy/orders 15000 &"):
        "needs a Kubernetes cluster with Istio",
    ("docs/policy.md", "python bench/policy_scale.py"): "a benchmark's timings",
    ("docs/reviewing-access.md", "extauthz inventory --policy extauthz/defaults/demo-policy "
     "--logs decisions.log --format table --width 400"): "figures of one demo run's log "
     "(times, counts); tests/e2e/test_review_e2e.py runs inventory and review on a real "
     "stack's log",
    ("docs/reviewing-access.md", "extauthz review --policy extauthz/defaults/demo-policy --logs "
     "decisions.log --patch-out tighten.patch --fail-on medium --min-denials 3"):
        "as above: one demo run's log",
    ("docs/operations.md", "docker run --read-only --cap-drop ALL --user 10001:10001 -v "
     "\"$PWD/policy:/etc/extauthz/policy:ro\" extauthz"): "needs Docker and the built image",
}


# Whole documents whose shell blocks no test runs, and why.
SKIPPED_DOCS = {
    "docs/benchmarks.md": "records of benchmark runs: each run's temporary paths, ports, pinned "
    "CPUs and load tools (h2load, wrk); bench/ has its own tests",
}


def test_every_shell_block_in_the_docs_is_run_or_skipped_for_a_reason() -> None:
    keys = [b.key for b in all_blocks() if b.doc not in SKIPPED_DOCS]
    assert len(keys) == len(set(keys))
    unknown = [f"{doc}: {first}" for doc, first in keys if (doc, first) not in {**RUN, **SKIPPED}]
    assert not unknown, "shell blocks no test runs (add them to RUN or SKIPPED):\n" + "\n".join(unknown)
    stale = sorted((set(RUN) | set(SKIPPED)) - set(keys))
    assert not stale, f"listed blocks no longer in the docs: {stale}"


def test_each_runner_named_exists_and_reads_the_doc_it_runs() -> None:
    for (doc, _first), runner in RUN.items():
        text = (REPO / runner).read_text()
        assert doc in text, f"{runner} does not read {doc}"
