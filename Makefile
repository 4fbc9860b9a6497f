# heloco-p2p: environment, tests and the main job.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# One pip command so the resolver sees the torch pin together with everything else:
# - torch==2.13.0 takes the local CPU build; an unpinned torch pulls several GB of CUDA packages.
# - numpy<2.4: hivemind 1.1.12 fails to decode its 8-bit compressions with numpy >= 2.4,
#   and inside averaging that failure is silent.
PINS := "torch==2.13.0" "numpy<2.4"

.PHONY: venv lint test test-fast test-slow train testnet clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PINS) -e ".[dev]" --config-settings editable_mode=compat
	touch $@

# pyflakes, isort and bugbear over the package, the tests and the scripts (pyproject.toml [tool.ruff])
lint: venv
	$(VENV)/bin/ruff check heloco_p2p tests scripts

# Two tiers (setup.cfg [tool:pytest] markers): the fast one (pure rules, messages, fakes; no process
# started, under 2 minutes) and the slow one (real peers, DHTs, p2pd, subprocesses). `test` runs both.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

test: venv
	$(PY) -m pytest -q --durations=25 tests

# Solo training of the tiny model on the built-in corpus (German Bible, Elberfelder 1932).
TRAIN_OUT ?= runs/train-$(shell date +%Y%m%d-%H%M%S)
train: venv
	$(VENV)/bin/heloco-peer train --config configs/tiny.yaml --region de --max-steps 300 --out $(TRAIN_OUT)

# The local testnet: 4 peers (de, fr, es, ru) at different speeds for about 5 minutes.
TESTNET_OUT ?= runs/testnet-$(shell date +%Y%m%d-%H%M%S)
TESTNET_MINUTES ?= 5
testnet: venv
	$(VENV)/bin/heloco-peer testnet --peers 'peers/*.yaml' --config configs/testnet.yaml --minutes $(TESTNET_MINUTES) --out $(TESTNET_OUT)

clean-venv:
	rm -rf $(VENV)
