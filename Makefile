# `make chat` / `make test` build .venv once (idempotent: a stamp file records the install), then
# start the demo chat / run the tests.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
PY := $(VENV)/bin/python

.PHONY: chat test venv reference bench clean

venv: $(STAMP)

$(STAMP): setup.py
	@echo "[1/3] creating $(VENV) with $(PYTHON)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	@echo "[2/3] upgrading pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "[3/3] installing mindspore, numpy, sentencepiece, pyyaml, safetensors, pytest (about a minute)"
	@$(PY) -m pip install --progress-bar on -e '.[test]'
	@touch $(STAMP) && echo "ready: $(PY)"

# The bundled tiny demo model (random weights): shows that the chat works on a fresh clone.
chat: $(STAMP)
	$(PY) run_chat.py

# Optional oracles (PyTorch CPU build + transformers) for the comparison tests; CI installs them.
reference: $(VENV)/.reference
$(VENV)/.reference: $(STAMP)
	$(PY) -m pip install -q 'torch==2.13.0' transformers peft || echo "reference packages unavailable: comparison tests will be skipped"
	touch $(VENV)/.reference

# Two pytest-xdist workers: much of the suite waits on subprocesses (servers warming up, msrun
# launches). On a 2-core Xeon: 1009 s in one process; 746-772 s on two, with two servers' warm-ups cut.
# loadfile keeps a module's tests in one worker, so its module-scoped launches (tensor parallelism's
# msrun run) happen once. (Not loadgroup: xdist 3.8 marks groups in Item._nodeid, which pytest 9.2's
# nodeid no longer returns, so the groups are silently ignored.)
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) build *.egg-info
