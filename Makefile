# Two commands do everything on a fresh clone: `make study` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STUDY  ?= studies/default.yaml
LOCK   := requirements.lock
TORCH  ?= 2.13.0
DASHBOARD_PORT ?= 8080

.PHONY: install lock study report ui dashboard test bench lint clean

install: $(STAMP)

# Reinstalls only when the dependencies or the lock change, so a second `make install` is a no-op. The lock pins
# every version (a study's numbers depend on them); pyproject.toml keeps ranges so `make lock` can move them.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Re-resolves pyproject.toml with every extra in a throwaway venv (the newest releases that fit, torch held at
# $(TORCH)) and writes $(LOCK). Local version labels (+cpu) are cut so each machine takes its own torch build, and
# the dry run against PyPI alone (no pip config, no local wheels) refuses a pin that only this machine's mirror has.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet 'torch==$(TORCH)' -e '.[dev,dashboard]'
	{ echo '# Pins for `make install` (pip constraints). Written by `make lock` with' \
	    "$$(.venv-lock/bin/python -V) on $$(uname -sm); do not edit by hand."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v '^#' | sed 's/+[^ ]*$$//'; } > .venv-lock/$(LOCK)
	PIP_CONFIG_FILE=/dev/null .venv-lock/bin/pip --isolated install --quiet --dry-run --ignore-installed \
	    -r .venv-lock/$(LOCK)
	mv .venv-lock/$(LOCK) $(LOCK) && rm -rf .venv-lock

study: install
	$(BIN)/ablate study $(STUDY)

report: install
	$(BIN)/ablate report --all

ui: install
	$(BIN)/ablate ui

# Optuna's own dashboard on the study storage ($ABLATE_STORAGE, else runs/optuna.db), on http://127.0.0.1:8080.
# optuna-dashboard is the `dashboard` extra, installed on first use, so that `make install` stays as it is.
dashboard: install
	$(BIN)/python -c 'import optuna_dashboard' 2>/dev/null || $(BIN)/pip install --quiet -c $(LOCK) -e '.[dashboard]'
	$(BIN)/ablate dashboard --port $(DASHBOARD_PORT)

# The layer contract in pyproject.toml first: an upward import or a cycle fails in seconds, before the suite.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q

bench: install
	$(BIN)/ablate bench

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs reports/*/ reports/index.html .pytest_cache .ruff_cache
