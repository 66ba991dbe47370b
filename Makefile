PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install test test-fast demo lint bench clean

$(BIN)/vlpet: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/vlpet

install: $(BIN)/vlpet

test: install
	$(BIN)/lint-imports
	$(BIN)/mypy vlpet_cli
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

demo: install
	$(BIN)/vlpet quickstart

lint: install
	$(BIN)/ruff check vlpet_cli tests benchmarks scripts

bench: install
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs build site *.egg-info
