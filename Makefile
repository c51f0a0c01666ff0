# glm-export: `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# the main job on the embedded tiny default: make a tiny ChatGLM3, export it, verify, print the summary
demo: setup
	$(VENV)/bin/glm-export tiny --generation chatglm3 --out out/tiny-chatglm3 --overwrite
	$(VENV)/bin/glm-export onnx --model out/tiny-chatglm3 --out out/tiny-chatglm3-onnx --overwrite

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/check_py38.sh
	bash .ci/mypy_tensorrt.sh
	$(PY) -m pytest -q tests

clean:
	rm -rf out .pytest_cache

# optimum pins transformers 4.57 (ours: 5.x), so its interop test runs in its own venv; not part of `make test`
OPT_VENV ?= .venv-optimum
.PHONY: test-optimum
test-optimum: setup
	test -x $(OPT_VENV)/bin/python || ($(PYTHON) -m venv $(OPT_VENV) && \
	  $(OPT_VENV)/bin/pip install -q torch==2.13.0 'optimum-onnx[onnxruntime]')
	GLM_EXPORT_OPTIMUM_PYTHON=$(abspath $(OPT_VENV))/bin/python $(PY) -m pytest -q tests/runtime/test_optimum_interop.py
