# Two commands on a fresh machine (see README):
#   make study   set up .venv, then run the main job: the CPU studies (configs/small.yaml, small512.yaml, mqar.yaml)
#   make test    set up .venv, then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Every dependency comes from a lock (exact versions and sha256 hashes, Linux x86_64, CPU torch):
# requirements/lock.txt for the package, requirements/lock-dev.txt adds the test and export extras.
# Where pip cannot find torch==2.13.0+cpu by itself (this machine keeps it in /opt/wheels), pass
# PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu". `make lock` refreshes both locks.
LOCK   ?= requirements/lock-dev.txt
PIP_EXTRA ?=
OUT    ?=
# OUT=DIR trains the studies into DIR, DIR-L512 and DIR-mqar instead of scaling/<study> (which, as committed,
# are complete: then `make study` only refits and redraws them)
OUT_FLAG := $(if $(OUT),--out $(OUT))

.PHONY: setup study tiny test test-slurm lock

# the lock pins torch's CPU build: a bare `torch` requirement would make pip fetch a multi-GB CUDA build
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps $(PIP_EXTRA) -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# Refresh both locks from pyproject.toml (newest versions that satisfy it; torch stays the pinned CPU build).
# pip-tools runs in a venv of its own, so it never lands in a lock. Commit the result with the reruns it needs.
LOCK_VENV := .venv-lock
LOCK_FLAGS = --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
             --constraint requirements/torch-cpu.txt $(PIP_EXTRA)
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install --quiet pip-tools; }
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --output-file requirements/lock.txt pyproject.toml requirements/build.in
	$(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra dev --output-file requirements/lock-dev.txt pyproject.toml requirements/build.in

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
