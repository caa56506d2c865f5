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

.PHONY: setup study tiny test test-slurm

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

# The ladder's Slurm path on a real one-node cluster started here (tools/slurm_cluster.sh: root, Debian
# packages): the tiny ladder as a job array, half of it cancelled mid-flight, rerun; then the cluster stops.
SLURM_DIR ?= /tmp/ssmscale-slurm
test-slurm: setup
	SLURM_DIR=$(SLURM_DIR) tools/slurm_cluster.sh up
	SLURM_CONF=$(SLURM_DIR)/slurm.conf $(BIN)/python -m pytest -q -s -m slurm tests/test_slurm.py; \
	rc=$$?; SLURM_DIR=$(SLURM_DIR) tools/slurm_cluster.sh down; exit $$rc
