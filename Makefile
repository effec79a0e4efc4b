# Two commands do all the set-up on a fresh clone: `make bench` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNS := runs

.PHONY: install bench test test-fast chromium clean

$(STAMP): pyproject.toml scripts/install-llamacpp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A dropped download of a big wheel resumes (--resume-retries); a registry that cuts one off for
	# good gets two more tries a minute apart before the install fails.
	for try in 1 2 3; do \
	  $(BIN)/python -m pip install -q --resume-retries 30 -e '.[test,ray]' && break; \
	  [ $$try = 3 ] && exit 1; echo "pip install failed (try $$try of 3); trying again in 60 s"; sleep 60; \
	done
	scripts/install-llamacpp $(VENV)  # compiled for this CPU once (about 5 min), then cached by its flags
	touch $(STAMP)

install: $(STAMP)

# Train the small GPT-2 and Llama-family presets once (cached by corpus, config and seed), then
# the default sweep (sweeps/default.toml) of every available backend on gpt2 and smollm2-135m
# and, for the finalists, on the two trained models, then the Markdown and HTML reports of that run.
bench: $(STAMP)
	$(BIN)/bench train --config sweeps/train-small.toml --out $(RUNS)/small-trained
	$(BIN)/bench train --config sweeps/train-llama-small.toml --out $(RUNS)/llama-small-trained
	$(BIN)/bench run --config sweeps/default.toml
	$(BIN)/bench report --format both --out $(RUNS)/report

# The headless-browser test of the HTML report needs Debian's chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium for the HTML report test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Two pytest workers, one test file each at a time (a module's fixtures stay in one process): most
# of a test's time is a process starting, imports and exports, which the second core overlaps.
# The tests marked serial (pytest-benchmark's suite, which measures nothing under xdist, and the
# check that bench compare finds a planted slowdown in real launches) run after, alone.
test: $(STAMP) chromium
	mkdir -p $(RUNS)
	$(BIN)/python -m pytest tests -n 2 --dist loadfile -m "not serial"
	$(BIN)/python -m pytest tests -m serial --benchmark-json=$(RUNS)/pytest-benchmark.json

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -x -q --benchmark-disable

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache
