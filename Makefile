# simbridge — the two commands: `make run` and `make test`. Each installs what it needs itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SOURCES := $(shell find src include -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' \)) pyproject.toml setup.py

# Debian packages the real-component tests need (a C compiler for the shm peers; each plane appends its
# own). Installed only when running as root and something is missing; otherwise the tests that need
# them say what to install (and fail under CI=true instead of skipping).
DEBIAN_PACKAGES := gcc g++ libc6-dev postgresql slurmctld slurmd slurm-client munge openssh-server

.PHONY: run run-cluster test lint typecheck imports unit integration bench install clean system-packages

system-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not root: cannot install $$missing (tests that need them will say so)"; fi; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel

# Re-install (and rebuild the C core) whenever a source, header or the project file changes.
$(STAMP): $(PY) $(SOURCES)
	$(PIP) install --quiet -e ".[all,dev]"
	@touch $(STAMP)

# The compiled launch wrapper is built by the install above; rebuilt alone if it went missing.
WRAPPER_BIN := src/simbridge/jobs/executors/simbridge-wrapper
$(WRAPPER_BIN): src/simbridge/jobs/executors/wrapper.c | $(STAMP)
	$(PY) setup.py -q build_ext --inplace

install: $(STAMP) $(WRAPPER_BIN)

run: $(STAMP)
	$(VENV)/bin/simbridge demo blocks
	@# The jobs pipeline on embedded defaults (SQLite under .work/, local executor): drop the
	@# example case into the inbox under a fresh name, serve until every beam has ended.
	@case=.work/inbox/example-$$(date +%Y%m%d-%H%M%S); mkdir -p .work/inbox && \
	  rm -rf .work/.case.partial && cp -r examples/mqi/case .work/.case.partial && \
	  mv .work/.case.partial $$case && touch $$case/READY && echo "dropped $$case into the inbox"
	SIMBRIDGE_CONFIG=examples/mqi/simbridge.yaml $(VENV)/bin/simbridge serve --until-idle

# The example case on a cluster: a loopback Slurm + sshd testbed (tests/testbed), the example's config
# pointed at it, serve until idle, status; the testbed is stopped whatever happens.
CLUSTER_DIR ?= /tmp/sb-run-cluster
run-cluster: $(STAMP) system-packages
	@rm -rf .work/cluster && mkdir -p .work/cluster/inbox
	@trap 'PYTHONPATH=. $(PY) -m tests.testbed down $(CLUSTER_DIR) || true' EXIT; \
	  PYTHONPATH=. $(PY) -m tests.testbed up $(CLUSTER_DIR) && \
	  PYTHONPATH=. $(PY) -m tests.testbed yaml $(CLUSTER_DIR) testbed > .work/cluster/clusters.yaml && \
	  $(PY) examples/mqi/cluster_config.py .work/cluster/clusters.yaml .work/cluster .work/cluster/simbridge.yaml && \
	  export SIMBRIDGE_CONFIG=.work/cluster/simbridge.yaml && \
	  $(VENV)/bin/simbridge clusters check testbed && \
	  cp -r examples/mqi/case .work/cluster/inbox/example && touch .work/cluster/inbox/example/READY && \
	  $(VENV)/bin/simbridge serve --until-idle --max-seconds 600 && \
	  $(VENV)/bin/simbridge status example

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

imports: $(STAMP)
	$(VENV)/bin/lint-imports

unit: $(STAMP) $(WRAPPER_BIN)
	$(PY) -m pytest tests/unit -q

integration: $(STAMP) $(WRAPPER_BIN)
	$(PY) -m pytest tests/integration -q

# Two workers: most integration tests wait on daemons and processes, so two cores run two at once.
TEST_WORKERS ?= 2

test: system-packages lint typecheck imports $(WRAPPER_BIN)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS)

bench: $(STAMP)
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info src/simbridge/**/*.so $(WRAPPER_BIN) .mypy_cache .ruff_cache .pytest_cache
