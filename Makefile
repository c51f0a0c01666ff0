# glm-export: `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-chatglm1 test bench clean cpp-deps cpp test-cpp cpp-asan

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

test: setup cpp
	PATH="$(abspath $(VENV))/bin:$$PATH" bash .ci/check_py38.sh
	bash .ci/mypy_tensorrt.sh
	cd $(CPP_BUILD) && ctest --output-on-failure
	$(PY) -m pytest -q tests

# ---- the C++ runtime (runtime/cpp): Debian packages, onnxruntime from the venv's wheel + fetched headers
CPP_BUILD ?= build/cpp
CPP_JOBS ?= 2
CPP_DEBS := cmake g++ make nlohmann-json3-dev libsentencepiece-dev libpcre2-dev libgtest-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

cpp-deps:
	@missing=$$(for p in $(CPP_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

cpp: setup cpp-deps
	cmake -S runtime/cpp -B $(CPP_BUILD) -DGLM_PYTHON=$(abspath $(PY)) >/dev/null
	cmake --build $(CPP_BUILD) -j$(CPP_JOBS)

test-cpp: cpp
	cd $(CPP_BUILD) && ctest --output-on-failure
	$(PY) -m pytest -q tests/cpp

# the C++ tests once under AddressSanitizer + UndefinedBehaviorSanitizer (not part of `make test`)
cpp-asan: setup cpp-deps
	cmake -S runtime/cpp -B build/cpp-asan -DGLM_PYTHON=$(abspath $(PY)) -DGLM_SANITIZE=ON \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build build/cpp-asan -j$(CPP_JOBS)
	cd build/cpp-asan && ASAN_OPTIONS=detect_leaks=1 ctest --output-on-failure
	ASAN_OPTIONS=detect_leaks=1 GLM_CPP_BUILD=$(abspath build/cpp-asan) $(PY) -m pytest -q tests/cpp

clean:
	rm -rf out .pytest_cache

# optimum pins transformers 4.57 (ours: 5.x), so its interop test runs in its own venv; not part of `make test`
OPT_VENV ?= .venv-optimum
.PHONY: test-optimum
test-optimum: setup
	test -x $(OPT_VENV)/bin/python || ($(PYTHON) -m venv $(OPT_VENV) && \
	  $(OPT_VENV)/bin/pip install -q torch==2.13.0 'optimum-onnx[onnxruntime]')
	GLM_EXPORT_OPTIMUM_PYTHON=$(abspath $(OPT_VENV))/bin/python $(PY) -m pytest -q tests/runtime/test_optimum_interop.py
