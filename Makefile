# Everything a fresh machine needs: `make test` and `make demo` set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := dataset-fashion-mnist wordnet-base
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The venv is installed without byte-compiling (--no-compile): pip compiled all 18.6k modules
# of every package, 74 of the 105 s it took here; Python compiles those a run imports (the
# suite's ~4.5k) on first import, and keeps them where it may write bytecode, so let it.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup apt maps test lint format demo bench clean

setup: $(STAMP)

# Debian packages with the offline real data (Fashion-MNIST, WordNet); skipped when present.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# Within the versions the suite last passed with (.ci/constraints.txt, which says how to refresh
# it): a new release of a dependency cannot break a run that passed.
$(STAMP): pyproject.toml .ci/constraints.txt | apt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c .ci/constraints.txt
	$(PY) -m pip install -q --no-compile -e '.[test]' -c .ci/constraints.txt
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# XLA:CPU maps memory for every compiled program: a test worker holds ~50k mappings by the end
# of the suite and crashed inside the compiler at Linux's default limit of 65530.
maps:
	@[ "$$(cat /proc/sys/vm/max_map_count 2>/dev/null || echo 262144)" -ge 262144 ] || \
	  $(SUDO) sysctl -q -w vm.max_map_count=262144 || echo "warning: vm.max_map_count is low"

test: setup apt lint maps
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --max-worker-restart=0 --durations=15 tests

demo: setup apt
	$(PY) -m experiments.demo

bench: setup
	$(PY) -m experiments.benchmarks.align

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
