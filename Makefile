# make run   : create .venv if missing, then run the whole pipeline (dvc repro)
# make test  : create .venv if missing, then the whole test suite: on every core (pytest-xdist), in random
#              order (pytest-randomly prints its seed; -p no:randomly for file order)
# make test-fast : the unit tests only (no pipeline runs, no servers), for every edit
# make setup : create or update .venv from requirements.lock + the package (editable)
# make team-server : the team's MLflow server on PostgreSQL (docs/team.md); TEAM_DIR, TEAM_HOST, TEAM_PORT
# make system-deps : PostgreSQL 15 and sshd from Debian's packages when missing (root; team mode's tests)
# make setup GPU=1 : the same with TensorFlow's CUDA build (tensorflow[and-cuda], the lock's version) instead
#                    of tensorflow-cpu; later make run/test keep it; make setup GPU=0 goes back to the CPU build
# The Python .venv is made from: Debian's python3.11 where there is one, else the first python3.11 on PATH.
# Debian's links libpython statically; pyenv's default build (first on PATH on our machines) loads it as a
# shared library, and every command starts slower on it: most of an imgclf, dvc or pytest process is
# importing Python code (benchmarks/interpreter.py: 0.88-0.91x the CPU on Debian's). An existing
# .venv keeps its Python (make clean-venv, then make setup, to change it); PYTHON=... picks another.
PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) python3.11)
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --quiet --disable-pip-version-check
# A venv set up with GPU=1 stays a GPU venv unless GPU=0 is given.
GPU    ?= $(if $(wildcard $(VENV)/.installed-gpu),1,0)
TF_VERSION := $(shell sed -n 's/^tensorflow_cpu==//p' requirements.lock)
STAMP  := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup run test test-fast lock clean-venv system-deps team-server

setup: $(STAMP)

# Both TensorFlow builds install the same `tensorflow` package folder: the other build is removed first.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	if $(PIP) show tensorflow >/dev/null 2>&1; then $(PIP) uninstall -y tensorflow tensorflow-cpu; fi
	$(PIP) install -r requirements.lock
	$(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import imgclf, tensorflow, mlflow, dvc" && rm -f $(VENV)/.installed-gpu && touch $@

$(VENV)/.installed-gpu: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	if $(PIP) show tensorflow-cpu >/dev/null 2>&1; then $(PIP) uninstall -y tensorflow-cpu; fi
	grep -v '^tensorflow_cpu==' requirements.lock > $(VENV)/requirements-gpu.txt
	$(PIP) install -r $(VENV)/requirements-gpu.txt 'tensorflow[and-cuda]==$(TF_VERSION)'
	$(PIP) install --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import imgclf, tensorflow as tf, mlflow, dvc; print('GPUs:', tf.config.list_physical_devices('GPU'))"
	rm -f $(VENV)/.installed && touch $@

run: $(STAMP)
	$(BIN)/imgclf validate
	$(BIN)/dvc repro

PYTEST := $(BIN)/python -m pytest
# xdist_group marks keep a module's shared server or training on one worker. Three workers per two cores:
# the end-to-end tests spend much of their time waiting on subprocesses and servers, so one worker per core
# leaves the cores idle a third of the time (12 min wall for 15 CPU-minutes on 2 cores); with three, and the
# `long(seconds)` tests first (tests/conftest.py), the cores are busy from the first minute to the last.
PARALLEL := -n $(shell echo $$(( ($$(nproc) * 3 + 1) / 2 ))) --dist loadgroup --durations=15

# Tests marked `alone` load every core by design: they run after the rest, by themselves. The grep spares
# collecting the whole suite a second time (~15 s) when no test is marked.
test: $(STAMP) system-deps
	$(PYTEST) $(PARALLEL) -m "not alone"
	if grep -rqs "mark.alone" tests; then $(PYTEST) -m alone; fi

test-fast: $(STAMP)
	$(PYTEST) $(PARALLEL) -m "not e2e and not alone"

system-deps:
	bash scripts/system_deps.sh

TEAM_DIR  ?= team-server
TEAM_HOST ?= 127.0.0.1
TEAM_PORT ?= 5000
team-server: $(STAMP) system-deps
	$(BIN)/imgclf-team serve --dir $(TEAM_DIR) --host $(TEAM_HOST) --port $(TEAM_PORT)

# The lock is the CPU environment: a GPU venv is switched back to tensorflow-cpu first.
lock: $(VENV)/.installed
	( echo '# The complete, exact environment `make setup` installs (pip freeze of a working .venv).'; \
	  echo '# Regenerate with `make lock` after changing pyproject.toml.'; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^imgclf' ) > requirements.lock

clean-venv:
	rm -rf $(VENV)
