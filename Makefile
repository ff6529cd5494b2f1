# Two environments, both built from pinned requirement files into .venvs/ (see README).
#   make demo   - build the full environment and run the main job (the demo, then the quick conformance check)
#   make test   - build both environments and run the whole test suite in each
#   make lint   - ruff
PY ?= python3
ENVS := full current

.PHONY: demo test test-full test-current lint envs clean

.venvs/%/.built: requirements/%.txt pyproject.toml
	$(PY) -m venv .venvs/$*
	.venvs/$*/bin/python -m pip install -q -r requirements/$*.txt
	.venvs/$*/bin/python -m pip install -q --no-deps -e .
	touch $@

envs: $(ENVS:%=.venvs/%/.built)

demo: .venvs/full/.built
	.venvs/full/bin/multibn demo
	.venvs/full/bin/multibn check --quick

test-full: .venvs/full/.built
	@echo "=== tests in the full environment (numpy 1.26, torch, jax 0.7, mxnet 1.9)"
	.venvs/full/bin/python -m pytest -q $(PYTEST_ARGS)

test-current: .venvs/current/.built
	@echo "=== tests in the current environment (numpy 2, torch, latest jax)"
	.venvs/current/bin/python -m pytest -q $(PYTEST_ARGS)

test: lint test-full test-current

lint: .venvs/full/.built
	.venvs/full/bin/ruff check .

clean:
	rm -rf .venvs
