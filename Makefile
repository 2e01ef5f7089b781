# Makefile for the GOAT attention reference. Every target has a comment saying when to use it.
#
#   make            build everything this machine can build (CPU always; CUDA parts when nvcc is found)
#   make demo       the main demo: the reference demo, then a short train_tiny run with the agreement report
#                   (on the GPU when there is one, otherwise a small CPU run of about a minute; no downloads)
#   make test       CPU tests, then the GPU tests if a CUDA device is present (otherwise says "skipped")
#   make test-asan  CPU tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-gpu   GPU tests only; fails when there is no GPU (use on the GPU machine)
#   make sanitize-gpu  compute-sanitizer memcheck and racecheck on the small GPU tests
#   make torch      the PyTorch binding's library (python/goat_torch/libgoat.so; needs nvcc, not PyTorch)
#   make test-torch the PyTorch binding's tests (PyTorch and pytest; the GPU ones skip without a device)
#   make bench      GPU benchmark (validates each kernel version, then times it)
#   make experiments   the paper's claims at a 10M-parameter scale (GPU; docs/EXPERIMENTS.md)
#   make ablation   why GOAT from uniform init does not extrapolate (CPU; docs/EXPERIMENTS.md)
#   make sinks      whether standard attention forms a sink at a trainable size (GPU; docs/EXPERIMENTS.md)
#   make clean      remove build/

CXX      ?= g++
CXXFLAGS ?= -O2 -g -std=c++17 -Wall -Wextra
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVFLAGS  ?= -O3 -std=c++17 $(NVARCH) -lineinfo -Xcompiler -Wall,-Wextra
DOCTEST_CFLAGS ?=
# GPUs: machine code for compute capability 8.0 (A100), 8.6 (RTX 30xx), 8.9 (RTX 40xx, L4) and 9.0a (H100, H200:
# v4-v6 need wgmma, which only the "a" target has), plus compute_90 PTX that newer GPUs compile at load time
# (v1-v3 run there). Narrow it for a faster build, e.g. make NVARCH="-gencode=arch=compute_90a,code=sm_90a".
NVARCH   ?= -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_86,code=sm_86 \
            -gencode=arch=compute_89,code=sm_89 -gencode=arch=compute_90a,code=sm_90a \
            -gencode=arch=compute_90,code=compute_90
BUILD    := build
TORCH_LIB := python/goat_torch/libgoat.so

CPU_TEST_SRC := tests/test_main.cpp tests/test_cpu.cpp tests/test_cpu_general.cpp tests/test_train.cpp
GPU_TEST_SRC := $(wildcard tests/test_gpu*.cu)
GOAT_DEPS    := goat.cu goat.h $(wildcard kernels/*.cuh) kernels/v7_plan.h

ifeq ($(NVCC),)
GPU_TARGETS :=
else
GPU_TARGETS := $(BUILD)/test_gpu $(BUILD)/bench
endif

# default: everything buildable here, and a line saying what was skipped
all: $(BUILD)/demo $(BUILD)/train_tiny $(BUILD)/test_cpu $(GPU_TARGETS)
ifeq ($(NVCC),)
	@echo "note: nvcc not found: GPU parts (goat.cu, GPU tests, bench) skipped"
endif

$(BUILD):
	@mkdir -p $(BUILD)

# the demo: reference.cpp with its main compiled in
$(BUILD)/demo: reference.cpp reference.h | $(BUILD)
	$(CXX) $(CXXFLAGS) -DGOAT_REFERENCE_MAIN reference.cpp -o $@

# CPU unit tests (doctest); tests/test_train.cpp includes train_tiny.cu (CPU part, main left out)
$(BUILD)/test_cpu: $(CPU_TEST_SRC) train_tiny.cu reference.cpp reference.h tests/test_util.h kernels/v7_plan.h | $(BUILD)
	$(CXX) $(CXXFLAGS) $(DOCTEST_CFLAGS) -I. $(CPU_TEST_SRC) reference.cpp -o $@

# the same tests with AddressSanitizer and UndefinedBehaviorSanitizer
$(BUILD)/test_cpu_asan: $(CPU_TEST_SRC) train_tiny.cu reference.cpp reference.h tests/test_util.h kernels/v7_plan.h | $(BUILD)
	$(CXX) -O1 -g -std=c++17 -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer $(DOCTEST_CFLAGS) -I. $(CPU_TEST_SRC) reference.cpp -o $@

# object files shared by the CUDA programs
$(BUILD)/reference.o: reference.cpp reference.h | $(BUILD)
	$(CXX) $(CXXFLAGS) -c reference.cpp -o $@
$(BUILD)/test_main.o: tests/test_main.cpp | $(BUILD)
	$(CXX) $(CXXFLAGS) $(DOCTEST_CFLAGS) -c tests/test_main.cpp -o $@
# goat.o is rebuilt when the nvcc flags change (NVARCH, ...): they are kept in $(BUILD)/nvflags.txt
$(BUILD)/nvflags.txt: FORCE | $(BUILD)
	@echo '$(NVFLAGS) -Xcompiler -fPIC' | cmp -s - $@ || echo '$(NVFLAGS) -Xcompiler -fPIC' > $@
FORCE:

# (position-independent, so that the shared library below links the same object)
$(BUILD)/goat.o: $(GOAT_DEPS) $(BUILD)/nvflags.txt | $(BUILD)
	$(NVCC) $(NVFLAGS) -Xcompiler -fPIC -Xptxas -v -c goat.cu -o $@ 2> $(BUILD)/goat.ptxas.txt || \
	    (cat $(BUILD)/goat.ptxas.txt; false)

# goat.cu as a shared library with a C interface (python/goat_capi.cpp), what the PyTorch binding loads
$(TORCH_LIB): python/goat_capi.cpp $(BUILD)/goat.o goat.h
	$(NVCC) $(NVFLAGS) -Xcompiler -fPIC -shared python/goat_capi.cpp $(BUILD)/goat.o -o $@

# GPU tests: every kernel version against its CPU twin
# (tests/test_gpu_train.cu includes train_tiny.cu, hence cuBLAS)
$(BUILD)/test_gpu: $(GPU_TEST_SRC) $(BUILD)/goat.o $(BUILD)/reference.o $(BUILD)/test_main.o tests/test_util.h tests/gpu_problem.h reference.h goat.h train_tiny.cu
	$(NVCC) $(NVFLAGS) $(DOCTEST_CFLAGS) -I. $(GPU_TEST_SRC) $(BUILD)/goat.o $(BUILD)/reference.o $(BUILD)/test_main.o -lcublas -o $@

# benchmark harness
$(BUILD)/bench: bench/bench.cu $(BUILD)/goat.o $(BUILD)/reference.o reference.h goat.h
	$(NVCC) $(NVFLAGS) -I. bench/bench.cu $(BUILD)/goat.o $(BUILD)/reference.o -o $@

# the tiny GOAT transformer: with nvcc, GPU (goat.cu + cuBLAS) and CPU backends; without, the CPU one only
# (the same file compiled as plain C++; -O3 lets g++ vectorise its loops)
ifeq ($(NVCC),)
$(BUILD)/train_tiny: train_tiny.cu reference.cpp reference.h | $(BUILD)
	$(CXX) $(CXXFLAGS) -O3 -x c++ train_tiny.cu reference.cpp -o $@
else
$(BUILD)/train_tiny: train_tiny.cu $(BUILD)/goat.o $(BUILD)/reference.o reference.h goat.h
	$(NVCC) $(NVFLAGS) -I. train_tiny.cu $(BUILD)/goat.o $(BUILD)/reference.o -lcublas -o $@
endif

# train_tiny's CPU demo config: about a minute on 2 cores (measured: ~85 ms/step, 600 steps)
TINY_CPU_DEMO := --layers 2 --heads 4 --head-dim 16 --context 64 --batch 8 --steps 600 --warmup 30 \
                 --val-every 100 --check 300 --sample-len 200

# the main demo: the reference demo, then train_tiny (the default GPU run when nvidia-smi sees a GPU,
# otherwise the small CPU config above)
demo: $(BUILD)/demo $(BUILD)/train_tiny
	./$(BUILD)/demo
	@if nvidia-smi -L >/dev/null 2>&1; then \
	    echo "== train_tiny: default run on the GPU, agreement report every 500 steps"; \
	    ./$(BUILD)/train_tiny --check 500 --svg $(BUILD)/prior.svg; \
	else \
	    echo "== train_tiny: no GPU found; a small CPU run (about a minute)"; \
	    ./$(BUILD)/train_tiny --device cpu $(TINY_CPU_DEMO) --svg $(BUILD)/prior.svg; \
	fi

# CPU tests, then GPU tests when a device is there; test_gpu exits 77 when it finds no CUDA device
test: $(BUILD)/test_cpu $(GPU_TARGETS)
	./$(BUILD)/test_cpu
ifeq ($(NVCC),)
	@echo "GPU tests: SKIPPED (nvcc not found; they were not built and are not counted as passed)"
else
	@./$(BUILD)/test_gpu; rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "GPU tests: SKIPPED (no CUDA device; not counted as passed)"; \
	elif [ $$rc -ne 0 ]; then echo "GPU tests: FAILED"; exit $$rc; fi
endif
	@if python3 -c 'import torch, pytest' 2>/dev/null; then $(MAKE) --no-print-directory test-torch; \
	else echo "PyTorch tests: SKIPPED (needs PyTorch and pytest; not counted as passed)"; fi

# CPU tests under the sanitizers (CI runs this too)
test-asan: $(BUILD)/test_cpu_asan
	./$(BUILD)/test_cpu_asan

# GPU tests only; no device is a failure here
test-gpu: $(BUILD)/test_gpu
	./$(BUILD)/test_gpu --require-gpu

# compute-sanitizer on the small-shape GPU tests (test cases whose name contains "small")
sanitize-gpu: $(BUILD)/test_gpu
	compute-sanitizer --tool memcheck --error-exitcode 1 ./$(BUILD)/test_gpu --require-gpu -tc='*small*'
	compute-sanitizer --tool racecheck --error-exitcode 1 ./$(BUILD)/test_gpu --require-gpu -tc='*small*'

# the PyTorch binding: its library, then its tests (PyTorch and pytest; those that need a GPU say "skipped"
# without one); `pip install ./python` does the first and installs the package
# (without nvcc the library is not built and the tests that need it say "skipped")
ifeq ($(NVCC),)
TORCH_TEST_DEPS :=
torch:
	@echo "make torch: nvcc not found; libgoat.so needs the CUDA Toolkit"; false
else
TORCH_TEST_DEPS := $(TORCH_LIB)
torch: $(TORCH_LIB)
endif
test-torch: $(TORCH_TEST_DEPS)
	python3 -m pytest -q python/tests

# benchmark (GPU machine)
bench: $(BUILD)/bench
	./$(BUILD)/bench

# the experiment tool: results table and SVG pictures from the CSVs train_tiny writes (plain C++)
$(BUILD)/report: experiments/report.cpp | $(BUILD)
	$(CXX) $(CXXFLAGS) experiments/report.cpp -o $@

# the paper's claims at a scale where they can show (GPU machine; docs/EXPERIMENTS.md): 6 priors x 3 seeds of a
# 10M-parameter model trained in bf16 at T = 512, evaluated at 1x-16x, sink statistics, the table and pictures in
# build/experiments/. SHAKESPEARE=path and DEBIAN_TEXT=path add those data sets; it resumes where it stopped
# (EXP_DEADLINE_S=seconds stops starting runs); EXP_TOY=1 runs a toy size on the CPU (checks the pipeline only)
experiments: $(BUILD)/train_tiny $(BUILD)/report
	SHAKESPEARE="$(SHAKESPEARE)" DEBIAN_TEXT="$(DEBIAN_TEXT)" TRAIN_TINY=$(BUILD)/train_tiny REPORT=$(BUILD)/report \
	    bash experiments/run.sh

# does standard attention form an attention sink at a size we can train, and does GOAT's u take the job over
# (GPU machine; experiments/sinks.sh: largest setting first; SINK_DATA=file, default the embedded corpus)
SINK_DATA ?=
sinks: $(BUILD)/train_tiny $(BUILD)/report
	TRAIN_TINY=$(BUILD)/train_tiny REPORT=$(BUILD)/report OUT_DIR=$(BUILD)/sinks bash experiments/sinks.sh $(SINK_DATA)

# which part of the GOAT prior keeps uniform init from extrapolating (experiments/ablation.sh; a CPU size, about
# 10 min per seed for every variant on 2 cores; ABLATION_DATA=file, default the embedded corpus; SEEDS="1 2 3")
ABLATION_DATA ?= -
SEEDS ?= 1
ablation: $(BUILD)/train_tiny
	TRAIN_TINY=$(BUILD)/train_tiny OUT_DIR=$(BUILD)/ablation bash experiments/ablation.sh $(ABLATION_DATA) "$(SEEDS)"

clean:
	rm -rf $(BUILD) $(TORCH_LIB)

.PHONY: all demo test test-asan test-gpu sanitize-gpu torch test-torch bench experiments sinks ablation clean FORCE
