# Two commands for a newcomer: `make speedrun` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/speedrun
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install speedrun test sync clean-run

install: $(STAMP)

# The venv sees system packages so that a torch already on the box (a CUDA build) is reused, never replaced.
# Only where no torch >= 2.8 is importable do we install torch==2.13.0 (a bare `torch` pulls gigabytes of CUDA).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python tools/has_torch.py || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[dev]"
	# the browser tests drive Debian's chromium through Playwright (never `playwright install`, which downloads)
	# as root (CI); elsewhere it says how, and the browser tests are skipped outside CI
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update && apt-get install -y chromium; } \
		|| echo "note: no chromium; install it with: sudo apt-get install chromium (browser tests need it)"
	touch $(STAMP)

# The main job: the pipeline's stages on the default offline corpus (a few minutes on 2 CPU cores).
speedrun: $(STAMP)
	nanochat-nb tokenizer train --vocab-size 4096 --run-dir $(RUN_DIR)
	nanochat-nb tokenizer eval --run-dir $(RUN_DIR)
	nanochat-nb data prepare --run-dir $(RUN_DIR)
	nanochat-nb pretrain --preset micro --run-dir $(RUN_DIR) --resume  # a second run continues (or finds it done)

# The whole test suite, in order; the first failure stops it.
test: $(STAMP)
	python tools/unchanged.py nbdev-clean
	python tools/unchanged.py nbdev-export
	python tools/check_pairs.py
	nbdev-test nbs --n-workers 1 --do-print
	python -m pytest -q tests

# After editing a chapter (either file of its pair): bring notebook, .py pair and package into line.
# Two rounds: the first may reformat, the second must change nothing (CI checks exactly that).
sync: $(STAMP)
	for i in 1 2; do jupytext --sync -q nbs/*.ipynb && nbdev-clean && nbdev-export || exit 1; done
