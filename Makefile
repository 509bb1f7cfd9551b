# Two commands for a newcomer: `make speedrun` and `make test`. Each sets itself up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
RUN_DIR ?= runs/speedrun
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install speedrun test sync clean-run book

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
	# the book draws its math with Debian's KaTeX files, offline
	test -d /usr/share/javascript/katex || { [ "$$(id -u)" = 0 ] && { apt-get install -y libjs-katex \
		|| { apt-get update && apt-get install -y libjs-katex; }; }; } \
		|| echo "note: no libjs-katex; install it with: sudo apt-get install libjs-katex (the book's math needs it)"
	touch $(STAMP)

# The main job: speedrun.ipynb under papermill, every stage from the tokenizer to the report card (micro: minutes on
# 2 CPU cores, offline). The executed notebook, the report and its charts land in $(RUN_DIR); running it again
# continues where it stopped. PRESET=d20 NPROC=8 for an 8-GPU box; SPEEDRUN_ARGS for more papermill -p/-y options.
PRESET ?= micro
NPROC  ?= 1
speedrun: $(STAMP)
	mkdir -p $(RUN_DIR)
	papermill speedrun.ipynb $(RUN_DIR)/speedrun.ipynb -k python3 --log-output --cwd $(CURDIR) -p run_dir $(RUN_DIR) \
		-p preset $(PRESET) -p nproc $(NPROC) $(SPEEDRUN_ARGS)

# The whole test suite, in order; the first failure stops it.
test: $(STAMP)
	python tools/unchanged.py nbdev-clean
	python tools/unchanged.py nbdev-export
	python tools/check_pairs.py
	nbdev-test nbs --n-workers 1 --do-print
	python -m pytest -q tests

# The book with its outputs, into book/: chapters executed (cached in build/book/: a rebuild re-runs only changed ones),
# rendered by Quarto when installed, else by Jupyter Book; then the browser test on the whole book.
book: $(STAMP)
	python tools/book.py
	BOOK_DIR=book python -m pytest -q tests/test_book.py

# After editing a chapter (either file of its pair): bring notebook, .py pair and package into line.
# Two rounds: the first may reformat, the second must change nothing (CI checks exactly that).
sync: $(STAMP)
	for i in 1 2; do jupytext --sync -q nbs/*.ipynb speedrun.ipynb && nbdev-clean && nbdev-clean --fname speedrun.ipynb \
		&& nbdev-export || exit 1; done
