# Two environments, both built from pinned requirement files into .venvs/ (see README).
#   make demo   - build the full environment and run the main job (the demo, then the quick conformance check)
#   make test   - build both environments and run the test suite in each: the whole suite in full, what differs in
#                 current (see test-current); the two builds side by side (2 jobs, each one's output printed whole
#                 when it ends), then each suite on two pytest-xdist workers, one suite after the other
#   make lint   - ruff
PY ?= python3
ENVS := full current

# Python writes the bytecode of what it imports (into the venvs, on first import) even where PYTHONDONTWRITEBYTECODE
# is set (as on this project's machines): pip installs without compiling every module of every wheel (45 of the full
# environment's 85 s of install), and the first test process compiles the few thousand modules the suite imports
# (4 s), where without bytecode every test process and subprocess would compile torch, jax and mxnet from source.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-full test-current lint envs clean

.venvs/%/.built: requirements/%.txt pyproject.toml
	$(PY) -m venv .venvs/$*
	.venvs/$*/bin/python -m pip install -q --no-compile -r requirements/$*.txt
	.venvs/$*/bin/python -m pip install -q --no-deps -e .
	touch $@

envs: $(ENVS:%=.venvs/%/.built)

demo: .venvs/full/.built
	.venvs/full/bin/multibn demo
	.venvs/full/bin/multibn check --quick

# MULTIBN_TEST_ENV names the environment to the suite (tests/helpers.py): a test dependency missing from it fails,
# except what requirements/<env>.txt leaves out by design (current: MXNet, Flax, Keras, ONNX), which skips.
# Each suite runs on two pytest-xdist workers (one per core), a test file at a time per worker (--dist loadfile: a
# module's fixtures run once; the longest files first: tests/conftest.py), each worker on one OpenMP thread (the suite's arrays are too small for intra-op
# threads) and compiling torch.compile's kernels in-process (inductor's pool of compile workers cost more than it
# saved: a cold cache's compile tests 155 s -> 90 s); the two suites run one after the other (three or four
# processes on two cores ran slower in all).
TEST_THREADS := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test-full: .venvs/full/.built
	@echo "=== tests in the full environment (numpy 1.26, torch, jax 0.7, mxnet 1.9): the whole suite"
	$(TEST_THREADS) MULTIBN_TEST_ENV=full .venvs/full/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# The current environment runs what differs there: NumPy 2, the newer JAX, array-api behaviour. It pins the same
# torch as the full one and has no MXNet, so tests/conftest.py deselects the tests of the torch and mxnet backends
# (a `backend` parameter of torch/mxnet, or the `torch`/`mxnet` markers) and of the command-line tool (`commands`:
# the same Python over the library); MULTIBN_ALL_IN_CURRENT=1 keeps them.
test-current: .venvs/current/.built
	@echo "=== tests in the current environment (numpy 2, latest jax): NumPy, JAX and framework-free tests"
	$(TEST_THREADS) MULTIBN_TEST_ENV=current .venvs/current/bin/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

test:
	$(MAKE) --no-print-directory -j2 --output-sync=target envs
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory --keep-going test-full test-current

lint: .venvs/full/.built
	.venvs/full/bin/ruff check .

clean:
	rm -rf .venvs
