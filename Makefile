# The two entry points of the README. Both set up .venv themselves (scripts/setup.sh).
.PHONY: demo test test-fast setup llamacpp lint

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/qqq-compile demo

# llama.cpp (llama-cpp-python built from its sdist, in a venv of its own: ~15 min once) checks
# our GGUF files with llama.cpp's own loader, tokenizer and kernels (tests/targets/gguf).
llamacpp:
	@bash benchmarks/peers/setup.sh llamacpp

test: setup llamacpp
	@if [ -x scripts/install_chromium.sh ]; then bash scripts/install_chromium.sh; fi
	QQQ_REQUIRE_LLAMACPP=1 TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests

# The same without the tests marked slow (they load SmolLM2 and the Wikipedia text).
test-fast: setup
	TRITON_INTERPRET=1 .venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: setup
	.venv/bin/ruff check qqq_compile tests benchmarks examples
