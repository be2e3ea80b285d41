# Set-up and checks; a fresh clone needs only python3 (>= 3.10) and this file.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel this machine carries, so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# LitGPT, the reference for tests/test_litgpt.py, in its own environment: it pins an older huggingface-hub.
LITGPT_VENV ?= .venv-litgpt
LITGPT_SPEC ?= litgpt==0.5.13

# llama.cpp's reference tools (converter, gguf-py, llama-quantize), built once into the cache (about 4 minutes on 2 cores).
LLAMA_CPP_CACHE ?= $(or $(LORASTREAM_CACHE),$(HOME)/.cache/lorastream)/llama.cpp

.PHONY: install demo test lint docs package-check bench clean llama-cpp

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

$(LITGPT_VENV)/bin/litgpt:
	python3 -m venv $(LITGPT_VENV)
	$(LITGPT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LITGPT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LITGPT_VENV)/bin/python -m pip install -q "$(LITGPT_SPEC)" "transformers<5"

demo: install
	$(VENV)/bin/lorastream demo

llama-cpp: install
	tools/llama_cpp.sh $(PY)
	$(PY) -m pip install -q "$(LLAMA_CPP_CACHE)/src/vendor/llama.cpp/gguf-py"

# pytest exits 5 when no test ran: that fails `make test` like any other failure.
test: install $(LITGPT_VENV)/bin/litgpt llama-cpp
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile
	$(MAKE) lint docs package-check

lint: install
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(PY) tools/check_structure.py

# The reference site, warnings as errors (mkdocs.yml sets strict).
docs: install
	$(VENV)/bin/mkdocs build -q

# The built wheel in a fresh environment with its core dependencies at their declared floors.
package-check:
	TORCH_SPEC="$(TORCH_SPEC)" tools/package_check.sh

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) $(LITGPT_VENV) build *.egg-info .pytest_cache .ruff_cache
