# The two entry points a newcomer needs; both set up everything first (scripts/setup.sh).
PY := .venv/bin/python
LAB ?= demo

.PHONY: setup demo demo-down test bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/kalki lab up --name $(LAB) $(if $(SCENARIO),--scenario $(SCENARIO))

demo-down: setup
	.venv/bin/kalki lab down $(LAB)

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv .pytest_cache

# The SD-card image (issue 5; README "The SD-card image"): build_image.sh runs the recipe in
# image/ as root and installs its own build dependencies. OUT, BASE_IMAGE and IMAGE optional.
.PHONY: image image-boot-test
OUT ?= out

image:
	./build_image.sh --out $(OUT) $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

image-boot-test:
	bash image/boot-test.sh $(IMAGE)
