# Two commands do everything on a fresh clone: `make study` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STUDY  ?= studies/default.yaml

.PHONY: install study report ui test bench lint clean

install: $(STAMP)

# Reinstalls only when the dependencies change, so a second `make install` is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

study: install
	$(BIN)/ablate study $(STUDY)

report: install
	$(BIN)/ablate report --all

ui: install
	$(BIN)/ablate ui

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/ablate bench

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs reports/*/ .pytest_cache .ruff_cache
