# dicomlab on a fresh machine:
#   make run    create .venv if needed, then serve every AE (archive 4000/5000, RIS 1104, print 2104)
#   make test   create .venv if needed, then lint, type-check and run the test suite
# .venv is (re)installed only when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help run test lint statements clean bench bench-quick bench-smoke

help:
	@echo "make run         serve the embedded default (archive 4000/5000, RIS 1104, print 2104)"
	@echo "make test        ruff, ruff format --check, mypy, pytest (what CI runs)"
	@echo "make lint        ruff and mypy only"
	@echo "make statements  regenerate statements/*.md from the code"
	@echo "make clean       remove caches (keeps .venv and data/)"
	@echo "make bench       dicomlab beside DCMTK, Orthanc, pynetdicom (full profile, ~45 min)"
	@echo "make bench-quick the same with small sizes (~8 min); bench-smoke: CI regression guard"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

run: $(STAMP)
	$(BIN)/dicomlab serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# The committed statements describe the embedded default, so no DICOMLAB_* variable
# of the caller's shell may leak into them.
statements: $(STAMP)
	env -i PATH="$$PATH" HOME="$$HOME" $(BIN)/dicomlab statement --output-dir statements

# Benchmarks (bench/README.md): install missing peers with apt-get, print one table,
# write bench/results/latest.md. bench-smoke fails only on gross regressions
# relative to peers measured in the same run.
bench: $(STAMP)
	$(BIN)/python -m bench --profile full

bench-quick: $(STAMP)
	$(BIN)/python -m bench --profile quick

bench-smoke: $(STAMP)
	$(BIN)/python -m bench.smoke

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
