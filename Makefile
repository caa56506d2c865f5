# Two commands on a fresh machine (see README):
#   make study   set up .venv, then run the main job: the CPU studies (configs/small.yaml, small512.yaml, mqar.yaml)
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
BIN    := $(VENV)/bin
OUT    ?=
# OUT=DIR trains the studies into DIR, DIR-L512 and DIR-mqar instead of scaling/<study> (which, as committed,
# are complete: then `make study` only refits and redraws them)
OUT_FLAG := $(if $(OUT),--out $(OUT))

.PHONY: setup study tiny test test-slurm

# torch first: a bare `torch` requirement would make pip fetch a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# the main study, its context-length contrast (which reads the main study), then the recall study
study: setup
	$(BIN)/ssmscale ladder configs/small.yaml $(OUT_FLAG)
	$(BIN)/ssmscale ladder configs/small512.yaml $(if $(OUT),--out $(OUT)-L512 --set contrast_with=$(notdir $(OUT)))
	$(BIN)/ssmscale ladder configs/mqar.yaml $(if $(OUT),--out $(OUT)-mqar)

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
