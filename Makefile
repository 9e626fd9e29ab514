# The two entry points a newcomer needs; both set up everything first (scripts/setup.sh).
PY := .venv/bin/python
LAB ?= demo

.PHONY: setup demo demo-down test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/kalki lab up --name $(LAB)

demo-down: setup
	.venv/bin/kalki lab down $(LAB)

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv .pytest_cache
