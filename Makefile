# Two commands do all the set-up: `make bench` and `make test` (see README.md).
# The variables below are set on the command line only (make bench OUT=dir): batch scripts often
# export OUT, RUN, A, B or ARGS for their own use, and those must not redirect a run. PYTHON is the
# same: an exported PYTHON (build tools, pyenv set-ups) is ignored, so only the command line
# changes the interpreter.
VENV = .venv
# The interpreter that creates $(VENV) (make bench PYTHON=/path/to/python3.12); it must meet
# pyproject's requires-python. An existing $(VENV) keeps its own: make clean-env bench PYTHON=...
PYTHON = python3
PY := $(VENV)/bin/python
SCENARIO = scenarios/default.yaml
OUT = results
# Extra arguments for harness.py run, e.g. ARGS="--set T=4096"
ARGS =
RUN =
A =
B =

.PHONY: env bench test report compare clean-env

env: $(VENV)/.hcbench-ready

$(VENV)/.hcbench-ready: pyproject.toml tools/make_env.py
	$(PYTHON) tools/make_env.py $(VENV)

# GPUS=N (N > 1) starts N ranks on this node with torchrun (docs/distributed.md).
GPUS = 1
LAUNCH = $(if $(filter-out 1,$(GPUS)),$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(GPUS),$(PY))

bench: env
	$(LAUNCH) harness.py run $(SCENARIO) --out $(OUT) $(ARGS)

# pytest exits 5 when it collects no test; that is a broken test tree, reported as such.
test: env
	$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

report: env
	$(PY) harness.py report $(RUN)

compare: env
	$(PY) harness.py compare $(A) $(B)

# The static dashboard of every run folder under results/ (RUNS may list run folders instead).
RUNS = results
SITE = results/dashboard
.PHONY: dashboard
dashboard: env
	$(PY) harness.py publish $(RUNS) --to $(SITE)

clean-env:
	rm -rf $(VENV)
