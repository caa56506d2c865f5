# Two commands on a fresh machine (see README):
#   make study   set up .venv, then run the main job: the CPU IsoFLOP study configs/small.yaml
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?=
# OUT=DIR trains the study into DIR instead of scaling/<study> (which, as committed, is already complete)
OUT_FLAG := $(if $(OUT),--out $(OUT))

.PHONY: setup study tiny test

# torch first: a bare `torch` requirement would make pip fetch a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

study: setup
	$(BIN)/ssmscale ladder configs/small.yaml $(OUT_FLAG)

tiny: setup
	$(BIN)/ssmscale ladder configs/tiny.yaml $(OUT_FLAG)

test: setup
	$(BIN)/python -m pytest -q
