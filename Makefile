# Set-up and checks; a fresh clone needs only python3 (>= 3.10) and this file.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel this machine carries, so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lorastream demo

test: install
	$(PY) -m pytest
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
