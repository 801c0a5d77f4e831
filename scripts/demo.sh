#!/usr/bin/env bash
# Real Envoy + extauthz + a sample upstream, real mTLS requests: allowed, denied, rate limited.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/extauthz demo "$@"
