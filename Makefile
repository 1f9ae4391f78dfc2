# QAFlow: `make run` (live demo) and `make test` do all set-up themselves:
# virtualenv, install, and RabbitMQ + a MongoDB-wire server when none is reachable.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ENVFILE := .qaflow/servers.env
WITH_SERVERS := set -a && . $(ENVFILE) && set +a &&

.PHONY: run test bench servers stop-servers venv clean doctor cluster-up cluster-down cluster-test cluster-bench

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@if [ ! -x $(BIN)/python ]; then \
	  $(PY) -m venv $(VENV) 2>/dev/null || { \
	    echo "[setup] python3 -m venv failed; installing Debian's python3-venv"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
	    rm -rf $(VENV) && $(PY) -m venv $(VENV); }; \
	fi
	@echo "[setup] installing qaflow and its test extras into $(VENV)"
	@$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	@echo "[setup] installing the CTP runtime (vn.py core + vnpy_ctp, compiled once: about 2 minutes)"
	@$(BIN)/pip install -q --disable-pip-version-check --no-deps -c constraints.txt vnpy vnpy_ctp
	@$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt ta-lib
	@touch $(STAMP)

servers: $(STAMP)
	@$(BIN)/python scripts/ensure_servers.py --env-file $(ENVFILE)

stop-servers:
	@$(BIN)/python scripts/ensure_servers.py --stop

run: servers
	@$(WITH_SERVERS) $(BIN)/qaflow demo $(if $(DURATION),--duration $(DURATION),)

test: servers
	@$(WITH_SERVERS) $(BIN)/python -m pytest -q

bench: servers
	@$(WITH_SERVERS) $(BIN)/python -m benchmarks.run --out benchmarks/results/latest.json

doctor: servers
	@$(WITH_SERVERS) $(BIN)/qaflow doctor

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info

# A three-node RabbitMQ cluster on loopback (AMQP 5681-5683, dist 25681-25683, management
# 15681-15683, data in .qaflow/cluster/); the default broker on 5672 is left alone.
CLUSTER_ENV := .qaflow/cluster.env
WITH_CLUSTER := set -a && . $(ENVFILE) && . $(CLUSTER_ENV) && set +a &&

cluster-up: $(STAMP)
	@$(BIN)/python scripts/cluster.py up

cluster-down:
	@$(BIN)/python scripts/cluster.py down

cluster-test: servers cluster-up
	@$(WITH_CLUSTER) QA_CLUSTER_TEST=1 $(BIN)/python -m pytest -q tests/cluster $(PYTEST_ARGS)

cluster-bench: servers cluster-up
	@$(WITH_CLUSTER) $(BIN)/python -m benchmarks.bench_cluster --out benchmarks/results/cluster.json

# Fault suite (tests/faults): kill -9 of each daemon, MongoDB and broker restarts (private
# servers), TCP cuts, fuzzed bad messages, security; prints the results table into docs/reliability.md.
.PHONY: faults
faults: servers
	@rm -f .qaflow/faults/results.jsonl
	@$(WITH_SERVERS) $(BIN)/python -m pytest -q tests/faults -m "integration or faults" $(PYTEST_ARGS); rc=$$?; \
	  $(BIN)/python scripts/faults_table.py --write docs/reliability.md; exit $$rc

# Soak (not in CI): the whole platform at 80 % of the tick pipeline's measured maximum for SOAK_MINUTES (10),
# or SOAK_RATE ticks/s; RSS, queue depths, broker memory every 10 s; writes docs/reliability.md "## Soak".
.PHONY: soak
soak: servers
	@$(WITH_SERVERS) $(BIN)/python scripts/soak.py --minutes $(or $(SOAK_MINUTES),10) $(if $(SOAK_RATE),--rate $(SOAK_RATE),) --write docs/reliability.md
