#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, packages, lint, types, unit, integration
# (real Redis) and end-to-end (real Envoy with real mTLS) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --with-system-packages
.venv/bin/ruff check extauthz tests scripts
.venv/bin/mypy
# Coverage gate: the level the whole suite reached after the move into sub-packages (issue 14,
# 89.8% of extauthz's statements in-process), rounded down. Raise it as tests grow; never lower
# it. A partial run (`scripts/test.sh tests/unit -k x`) can skip the gate with `--no-cov`.
exec .venv/bin/python -m pytest --cov=extauthz --cov-report=term:skip-covered \
  --cov-fail-under=89 "$@"
