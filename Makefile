# Two commands do all setup on a fresh machine:
#   make serve   environment + default model (fetched, converted, recovered) + OpenAI server on 127.0.0.1:8000
#   make test    environment + the whole test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
DEFAULT_SRC := $(MODELS)/SmolLM2-135M-Instruct
DATA ?= data
CALIBRATION := $(DATA)/wiki/tune.txt
# The default served checkpoint; see README "Default model" for why this rank and strategy.
RANK ?= 32
ROPE ?= mixed
DEFAULT_THIN := $(MODELS)/SmolLM2-135M-Instruct-thin-r$(RANK)-$(ROPE)
# Recovery (`thinkeys finetune`, tune split only), two stages that each write a checkpoint:
# layer-wise distillation of the thin q/k projections toward the source's attention outputs
# (-lw, minutes), then E2E_MINUTES of end-to-end distillation to the source's next-token
# distribution (-lw-e2eN). E2E_MINUTES=0 serves the layer-wise stage, RECOVER=0 the plain conversion.
RECOVER ?= 1
LAYERWISE_STEPS ?= 200
LAYERWISE_WINDOWS ?= 32
E2E_MINUTES ?= 22
LAYERWISE := $(DEFAULT_THIN)-lw
END_TO_END := $(LAYERWISE)-e2e$(E2E_MINUTES)
SERVED := $(if $(filter 0,$(RECOVER)),$(DEFAULT_THIN),$(if $(filter 0,$(E2E_MINUTES)),$(LAYERWISE),$(END_TO_END)))
HOST ?= 127.0.0.1
PORT ?= 8000
KV_CACHE_GIB ?= 1
SERVE_FLAGS ?=

.PHONY: setup serve test fetch convert clean-models

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[cpu,tools,test]"
	# pip pulls CUDA builds of these through vLLM; with the CPU torch they break `import vllm`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import vllm, thinkeys; print('vllm', vllm.__version__)"
	touch $@

fetch: setup
	$(BIN)/thinkeys fetch --models-dir $(MODELS) --data-dir $(DATA)

$(DEFAULT_SRC)/config.json $(CALIBRATION) &: | setup
	$(BIN)/thinkeys fetch --models-dir $(MODELS) --data-dir $(DATA)

# Calibrated on the tune split only; perplexity is measured on the held-out eval split.
$(DEFAULT_THIN)/config.json: $(DEFAULT_SRC)/config.json $(CALIBRATION)
	$(BIN)/thinkeys convert $(DEFAULT_SRC) $(DEFAULT_THIN) --rank $(RANK) --rope $(ROPE) \
		--calibration $(CALIBRATION) --force

$(LAYERWISE)/config.json: $(DEFAULT_THIN)/config.json
	$(BIN)/thinkeys finetune $(DEFAULT_THIN) $(LAYERWISE) --teacher $(DEFAULT_SRC) --text $(CALIBRATION) \
		--layerwise-steps $(LAYERWISE_STEPS) --layerwise-windows $(LAYERWISE_WINDOWS) --force

$(END_TO_END)/config.json: $(LAYERWISE)/config.json
	$(BIN)/thinkeys finetune $(LAYERWISE) $(END_TO_END) --teacher $(DEFAULT_SRC) --text $(CALIBRATION) \
		--layerwise-steps 0 --e2e-minutes $(E2E_MINUTES) --force

convert: $(SERVED)/config.json

serve: setup $(SERVED)/config.json
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-$(KV_CACHE_GIB)} \
	$(BIN)/thinkeys serve $(SERVED) --host $(HOST) --port $(PORT) \
		--served-model-name smollm2-thin $(SERVE_FLAGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-models:
	rm -rf $(MODELS)
