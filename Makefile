# `make test` builds .venv once (idempotent: a stamp file records the install) and runs pytest.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: test venv reference bench clean

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Optional oracles (PyTorch CPU build + transformers) for the comparison tests; CI installs them.
reference: $(VENV)/.reference
$(VENV)/.reference: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' transformers || echo "reference packages unavailable: comparison tests will be skipped"
	touch $(VENV)/.reference

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
