# The two entry points a newcomer needs; both set up everything first (scripts/setup.sh).
PY := .venv/bin/python
LAB ?= demo

.PHONY: setup demo demo-down test test-unit faults lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/kalki lab up --name $(LAB) --chatter $(if $(SCENARIO),--scenario $(SCENARIO))

demo-down: setup
	.venv/bin/kalki lab down $(LAB)

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Fault injection in the lab (tests/test_fault_injection.py, also part of `make test`): each case
# has a fixed seed; the counts go to test-artifacts/faults.json and the last line printed.
faults: setup
	$(PY) -m pytest -q -ra -s -m faults $(PYTEST_ARGS)

# The tests that need no root, no namespaces and no kernel: policy, store, profiles, vocab, the
# web page and the panel over fakes. Sets up only when there is no .venv yet.
test-unit:
	@[ -x $(PY) ] || bash scripts/setup.sh
	$(PY) -m pytest -q -ra -m "not lab" $(PYTEST_ARGS)

# ruff and mypy (configured in pyproject.toml) and shellcheck on the shell scripts.
lint:
	@[ -x $(PY) ] || bash scripts/setup.sh
	$(PY) -m ruff check appliance lab tests bench
	$(PY) -m mypy
	bash scripts/lint-shell.sh

# Each benchmark's JSON lines go to build/bench/, and bench/README.md's summary table is made
# from them.
bench: setup
	@mkdir -p build/bench
	@bash -o pipefail -c 'for b in bench/bench_*.py; do $(PY) $$b | tee build/bench/$$(basename $$b .py).jsonl || exit 1; done'
	$(PY) bench/summary.py build/bench bench/README.md

clean:
	rm -rf .venv .pytest_cache

# The SD-card image (issue 5; docs/image.md): build_image.sh runs the recipe in
# image/ as root and installs its own build dependencies. OUT, BASE_IMAGE and IMAGE optional.
.PHONY: image image-boot-test
OUT ?= out

image:
	./build_image.sh --out $(OUT) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

image-boot-test:
	bash image/boot-test.sh $(IMAGE)
