#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, packages, lint, types, unit, integration
# (real Redis) and end-to-end (real Envoy with real mTLS) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --with-system-packages
.venv/bin/ruff check extauthz tests scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
