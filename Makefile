# Two set-up commands: `make demo` (install + run the main job on embedded defaults), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test venv system-deps lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

system-deps:
	bash scripts/system_deps.sh

demo: venv system-deps
	$(PY) jobs/demo.py --out runs

test: venv
	bash scripts/system_deps.sh test
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check platform jobs tests benchmarks

clean:
	rm -rf $(VENV) runs
