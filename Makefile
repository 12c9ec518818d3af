# The two commands a fresh clone needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
DB ?= data/fraudlens.duckdb
PORT ?= 8501
# Loopback by default: the app shows customer data; set ADDRESS=0.0.0.0 to share it deliberately.
ADDRESS ?= 127.0.0.1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test install demo lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Bytecode for the installed packages, once, for `make run`. The install skips it (--no-compile:
# faster, and tests import little of each package), and where PYTHONDONTWRITEBYTECODE is set
# (as on the development VM) Python never caches it either, so every server start compiled
# torch, transformers and Streamlit from source again: 35 s to a listening server instead of
# 14 s (benchmarks/bench_ui.py, side by side). About a minute on 2 cores. A few files written
# for newer Pythons (torch's py312 test helpers) do not compile; that is harmless, hence `-`.
$(COMPILED): $(STAMP)
	-$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null
	touch $(COMPILED)

demo: $(STAMP)
	$(VENV)/bin/fraudlens demo --db $(DB)

# prepare: builds the demo database if absent, trains and scores a model if none exists.
run: $(COMPILED)
	$(VENV)/bin/fraudlens prepare --db $(DB)
	@# pages._serve = `streamlit run app.py` with torch/transformers/Captum imported first
	FRAUDLENS_DB=$(DB) $(VENV)/bin/python -m pages._serve --server.port $(PORT) \
		--server.address $(ADDRESS) --server.headless true --browser.gatherUsageStats false

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install Debian chromium; browser tests will be skipped"; }

test: $(STAMP) chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_store.py

clean:
	rm -rf $(VENV) data/*.duckdb data/models
