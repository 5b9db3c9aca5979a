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

# torch: the CPU build. This machine keeps its wheel on disk (pip's find-links); elsewhere, point pip at
# PyTorch's CPU index: make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test venv bench clean distclean browser

venv: $(STAMP)

# A virtualenv holds its own path (script shebangs, the editable install): one made for a checkout that
# has since moved is rebuilt, not trusted (its `sieve` would not run and its tests would import the old
# checkout).
VENV_HERE := $(shell cd "$(VENV)" 2>/dev/null && pwd -P)
ifneq ($(wildcard $(STAMP)),)
ifneq ($(shell cat "$(VENV)/.sieve-path" 2>/dev/null),$(VENV_HERE))
$(info $(VENV) was made for another location of this checkout: rebuilding it)
VENV_CLEAR := --clear
VENV_MOVED := venv-moved
endif
endif
.PHONY: venv-moved

# torch first, the CPU build (checked before it is downloaded: a CUDA build is refused); the
# constraints file then stops any dependency from replacing it with a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt $(VENV_MOVED)
	$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 'Sieve needs Python 3.11 or newer; run make PYTHON=python3.11')"
	$(PYTHON) -m venv $(VENV_CLEAR) $(VENV)
	$(BIN)/python -m pip install --quiet --dry-run --report $(VENV)/torch-plan.json $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -c "import json, sys; cuda = [i['metadata']['name'] for i in json.load(open('$(VENV)/torch-plan.json'))['install'] if i['metadata']['name'].lower().startswith(('nvidia', 'triton'))]; sys.exit(f'torch==2.13.0 resolves to a CUDA build here (it would pull {len(cuda)} CUDA packages, several GB): nothing installed. Give pip the CPU build: make TORCH_PIP_ARGS=\"--index-url https://download.pytorch.org/whl/cpu\"' if cuda else 0)"
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else f'torch {torch.__version__} is a CUDA build; run make distclean, then make TORCH_PIP_ARGS=\"--index-url https://download.pytorch.org/whl/cpu\"')"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[models,server,dev]'
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	cd "$(VENV)" && pwd -P > .sieve-path
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

# The report tests render HTML in a real headless browser and read its printout: Debian's chromium and poppler-utils
# (pdftotext), installed when missing
# (needs root and the apt mirror; without them the test skips and says why).
browser:
	@(command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1) && command -v pdftotext >/dev/null 2>&1 || \
		(DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium poppler-utils) || \
		echo "warning: could not install chromium and poppler-utils; the HTML report browser tests will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest

# The quick benchmarks (minutes on 2 cores); the SciFact quality runs that rerank every test query
# (bench/rerank_quality.py, bench/signals_scifact.py, `sieve eval`) are listed in the README.
bench: $(STAMP)
	@test -f ../shared/data/scifact/corpus.jsonl -a -f ../shared/data/cast/rewrites_2019_2020.jsonl || { \
		echo "make bench reads SciFact and TREC CAsT from ../shared/data/scifact and ../shared/data/cast, beside this checkout; they are not there"; exit 2; }
	$(BIN)/python bench/bm25_scifact.py
	$(BIN)/python bench/rules_overhead.py --queries 100 --repeats 5
	$(BIN)/python bench/rerank_throughput.py
	$(BIN)/python bench/cast_rewrite.py
	$(BIN)/python bench/server_overhead.py

# Build outputs only: traces/ holds the hash-chained audit log, which no make target deletes.
clean:
	rm -rf build .pytest_cache

distclean: clean
	rm -rf $(VENV)
