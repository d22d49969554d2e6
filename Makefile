# The two entry points of the README. Both set up .venv themselves (scripts/setup.sh).
.PHONY: demo test test-fast setup lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/qqq-compile demo

test: setup
	@if [ -x scripts/install_chromium.sh ]; then bash scripts/install_chromium.sh; fi
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests

# The same without the tests marked slow (they load SmolLM2 and the Wikipedia text).
test-fast: setup
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: setup
	.venv/bin/ruff check qqq_compile tests benchmarks examples
