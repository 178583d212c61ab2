# make run   : create .venv if missing, then run the whole pipeline (dvc repro)
# make test  : create .venv if missing, then the whole test suite
# make setup : create or update .venv from requirements.lock + the package (editable)
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup run test lock clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import imgclf, tensorflow, mlflow, dvc" && touch $(STAMP)

run: $(STAMP)
	$(BIN)/imgclf validate
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

lock: $(STAMP)
	( echo '# The complete, exact environment `make setup` installs (pip freeze of a working .venv).'; \
	  echo '# Regenerate with `make lock` after changing pyproject.toml.'; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^imgclf' ) > requirements.lock

clean-venv:
	rm -rf $(VENV)
