PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
LATEST := .venv-latest
# where a CPU build of torch lies as a wheel, if anywhere (used by `make lock` only)
TORCH_WHEELS ?= /opt/wheels
export HF_HUB_OFFLINE := 1

.PHONY: install lock test test-fast test-latest demo lint bench clean

# The locked environment: every package at the version and hash of requirements.lock, then torch at the version
# constraints.txt pins (the lock leaves torch out: its build depends on the machine, CPU or CUDA), then vlpet
# itself, editable. `pip check` fails the install if the lock misses a dependency of pyproject.toml.
$(BIN)/vlpet: pyproject.toml $(LOCK) constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(BIN)/vlpet

install: $(BIN)/vlpet

# Regenerate requirements.lock from pyproject.toml (the dev extra, which holds every other extra, and the build
# backend), for this venv's Python, with hashes; keeps the versions already locked unless asked: `make lock
# UPGRADE=1` takes the newest the bounds allow, `make lock UPGRADE="typer rich"` only those packages.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q 'uv<1'
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])' \
	| tr ' ' '\n' | UV_CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/uv pip compile -q pyproject.toml - \
		--extra dev -c constraints.txt --python $(BIN)/python --generate-hashes --no-emit-package torch \
		$(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) \
		$(if $(filter 1,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))) -o $(LOCK)

test: install
	$(BIN)/lint-imports
	$(BIN)/mypy vlpet_cli
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not cli"

# The fast tests on the newest versions pyproject.toml's bounds allow (torch stays at constraints.txt's pin), in a
# separate venv: run it before raising a bound or refreshing the lock.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	@echo "newest versions the bounds allow: $(LATEST)/versions.txt"
	$(LATEST)/bin/vlpet --version
	$(LATEST)/bin/lint-imports
	$(LATEST)/bin/python -m pytest -m "not slow"

demo: install
	$(BIN)/vlpet quickstart

lint: install
	$(BIN)/ruff check vlpet_cli tests benchmarks scripts

bench: install
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) $(LATEST) runs build site *.egg-info
