# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sieve-installed
DEMO_INDEX := build/demo-index
DEMO_QUERY ?= Is metformin safe for patients with kidney disease?
DEMO_USER ?= --role clinician --jurisdiction US --as-of 2025-06-01
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test venv bench clean browser

venv: $(STAMP)

# torch first, from the CPU wheel this machine keeps on disk; the constraints file then stops
# any dependency from replacing it with a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[models,server,dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

$(DEMO_INDEX)/manifest.json: $(STAMP) examples/medical/corpus.jsonl configs/medical/entities.yaml configs/medical/index-settings.yaml
	$(BIN)/sieve index examples/medical --out $(DEMO_INDEX) --with bm25 --with dense --with entities \
		--settings configs/medical/index-settings.yaml

demo: $(DEMO_INDEX)/manifest.json
	$(BIN)/sieve validate configs/demo.yaml
	$(BIN)/sieve search configs/demo.yaml "$(DEMO_QUERY)" $(DEMO_USER) --explain --trace-out build/demo-trace.json
	$(BIN)/sieve replay build/demo-trace.json
	$(BIN)/sieve report build/demo-trace.json --html build/demo-report.html
	$(BIN)/sieve trace verify traces/trace.jsonl

# The report test renders HTML in a real headless browser: Debian's chromium, installed when missing
# (needs root and the apt mirror; without them the test skips and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "warning: could not install chromium; the HTML report browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest

# The quick benchmarks (minutes on 2 cores); the SciFact quality runs that rerank every test query
# (bench/rerank_quality.py, bench/signals_scifact.py, `sieve eval`) are listed in the README.
bench: $(STAMP)
	$(BIN)/python bench/bm25_scifact.py
	$(BIN)/python bench/rules_overhead.py --queries 100 --repeats 5
	$(BIN)/python bench/rerank_throughput.py
	$(BIN)/python bench/cast_rewrite.py
	$(BIN)/python bench/server_overhead.py

clean:
	rm -rf build traces .pytest_cache
