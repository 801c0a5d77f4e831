# Entry points; each one works from a fresh clone.
#   make test    lint, types, unit, integration and end-to-end tests (scripts/test.sh)
#   make demo    a local mesh with real Envoy and real mTLS (scripts/demo.sh)
#   make bench   the benchmark (~6 min): prints a table, writes docs/benchmarks.{md,png}
#                BENCH_ARGS="--quick" for a short try; PYTHON=... to use another interpreter

PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: test demo bench

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
ifeq ($(PYTHON),.venv/bin/python)
	bash scripts/bootstrap.sh
	.venv/bin/python -m pip install -q -e '.[envoy,bench]'
endif
	$(PYTHON) bench/run.py $(BENCH_ARGS)
