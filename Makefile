# The two set-up commands of README: `make demo` (main job) and `make test` (suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test

install:
	$(PIP) -e ".[torch,dev]"

demo: install
	$(PYTHON) examples/01_vit_token_pruning.py

test: install
	$(PYTHON) -m pytest -q -ra
