# Every target depends on the virtual environment, so on a fresh machine
# `make train N=50` and `make test` are the only commands a user types.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Training and data knobs. Empty means "use the preset's value"; see README.
N ?=
NORM ?=
MODE ?=
SIGMA ?=
LAYERS ?=
HIDDEN ?=
EPOCHS ?=
LR ?=
BATCH ?=
SEED ?=
PRESET ?=
RUN_DIR ?=
ARGS ?=

opt = $(if $(strip $(2)),$(1) $(2))
TRAIN_FLAGS = $(call opt,--n-particles,$(N)) \
	$(call opt,--norm,$(NORM)) $(call opt,--norm-mode,$(MODE)) \
	$(call opt,--sigma,$(SIGMA)) $(call opt,--layers,$(LAYERS)) \
	$(call opt,--hidden,$(HIDDEN)) $(call opt,--epochs,$(EPOCHS)) \
	$(call opt,--lr,$(LR)) $(call opt,--batch-size,$(BATCH)) \
	$(call opt,--seed,$(SEED)) $(call opt,--preset,$(PRESET)) \
	$(call opt,--run-dir,$(RUN_DIR)) $(ARGS)

.PHONY: venv train data test test-all bench bench-data bench-model \
	figure2 figure5 table1 clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m geonorm_jax.train $(TRAIN_FLAGS)

data: $(STAMP)
	$(PY) -m geonorm_jax.dataset --n-particles $(or $(N),50) $(call opt,--seed,$(SEED)) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Includes the tests marked slow (larger systems, longer training).
test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.report $(ARGS)

bench-data: $(STAMP)
	$(PY) -m benchmarks.bench_data $(ARGS)

bench-model: $(STAMP)
	$(PY) -m benchmarks.bench_model $(ARGS)

figure2: $(STAMP)
	$(PY) experiments/figure2.py $(ARGS)

figure5: $(STAMP)
	$(PY) experiments/figure5.py $(ARGS)

table1: $(STAMP)
	$(PY) experiments/table1.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
