# glm-export: `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-chatglm1 test bench clean

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

# the same for the original ChatGLM-6B (v1: 2D positions, prefix-LM attention, ice_text tokenizer), then a chat prompt
demo-chatglm1: setup
	$(VENV)/bin/glm-export tiny --generation chatglm1 --out out/tiny-chatglm1 --overwrite
	$(VENV)/bin/glm-export onnx --model out/tiny-chatglm1 --out out/tiny-chatglm1-onnx --overwrite
	$(VENV)/bin/glm-export run --model out/tiny-chatglm1-onnx --chat --prompt "你好" --max-new-tokens 8

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/check_py38.sh
	bash .ci/mypy_tensorrt.sh
	$(PY) -m pytest -q tests

clean:
	rm -rf out .pytest_cache
