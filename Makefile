# Makefile for the GOAT attention reference. Every target has a comment saying when to use it.
#
#   make            build everything this machine can build (CPU always; CUDA parts when nvcc is found)
#   make demo       the main demo (CPU; no GPU, no downloads)
#   make test       CPU tests, then the GPU tests if a CUDA device is present (otherwise says "skipped")
#   make test-asan  CPU tests under AddressSanitizer + UndefinedBehaviorSanitizer
#   make test-gpu   GPU tests only; fails when there is no GPU (use on the GPU machine)
#   make sanitize-gpu  compute-sanitizer memcheck and racecheck on the small GPU tests
#   make bench      GPU benchmark (validates each kernel version, then times it)
#   make clean      remove build/

CXX      ?= g++
CXXFLAGS ?= -O2 -g -std=c++17 -Wall -Wextra
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVFLAGS  ?= -O3 -std=c++17 -arch=sm_90 -lineinfo -Xcompiler -Wall,-Wextra
DOCTEST_CFLAGS ?=
BUILD    := build

CPU_TEST_SRC := tests/test_main.cpp tests/test_cpu.cpp
GPU_TEST_SRC := $(wildcard tests/test_gpu*.cu)
GOAT_DEPS    := goat.cu goat.h $(wildcard dev/*.cu)

ifeq ($(NVCC),)
GPU_TARGETS :=
else
GPU_TARGETS := $(BUILD)/test_gpu $(BUILD)/bench
endif

# default: everything buildable here, and a line saying what was skipped
all: $(BUILD)/demo $(BUILD)/test_cpu $(GPU_TARGETS)
ifeq ($(NVCC),)
	@echo "note: nvcc not found: GPU parts (goat.cu, GPU tests, bench) skipped"
endif

$(BUILD):
	@mkdir -p $(BUILD)

# the demo: reference.cpp with its main compiled in
$(BUILD)/demo: reference.cpp reference.h | $(BUILD)
	$(CXX) $(CXXFLAGS) -DGOAT_REFERENCE_MAIN reference.cpp -o $@

# CPU unit tests (doctest)
$(BUILD)/test_cpu: $(CPU_TEST_SRC) reference.cpp reference.h tests/test_util.h | $(BUILD)
	$(CXX) $(CXXFLAGS) $(DOCTEST_CFLAGS) -I. $(CPU_TEST_SRC) reference.cpp -o $@

# the same tests with AddressSanitizer and UndefinedBehaviorSanitizer
$(BUILD)/test_cpu_asan: $(CPU_TEST_SRC) reference.cpp reference.h tests/test_util.h | $(BUILD)
	$(CXX) -O1 -g -std=c++17 -Wall -Wextra -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer $(DOCTEST_CFLAGS) -I. $(CPU_TEST_SRC) reference.cpp -o $@

# object files shared by the CUDA programs
$(BUILD)/reference.o: reference.cpp reference.h | $(BUILD)
	$(CXX) $(CXXFLAGS) -c reference.cpp -o $@
$(BUILD)/test_main.o: tests/test_main.cpp | $(BUILD)
	$(CXX) $(CXXFLAGS) $(DOCTEST_CFLAGS) -c tests/test_main.cpp -o $@
$(BUILD)/goat.o: $(GOAT_DEPS) | $(BUILD)
	$(NVCC) $(NVFLAGS) -Xptxas -v -c goat.cu -o $@ 2> $(BUILD)/goat.ptxas.txt || (cat $(BUILD)/goat.ptxas.txt; false)

# GPU tests: every kernel version against its CPU twin
$(BUILD)/test_gpu: $(GPU_TEST_SRC) $(BUILD)/goat.o $(BUILD)/reference.o $(BUILD)/test_main.o tests/test_util.h reference.h goat.h
	$(NVCC) $(NVFLAGS) $(DOCTEST_CFLAGS) -I. $(GPU_TEST_SRC) $(BUILD)/goat.o $(BUILD)/reference.o $(BUILD)/test_main.o -o $@

# benchmark harness
$(BUILD)/bench: bench/bench.cu $(BUILD)/goat.o $(BUILD)/reference.o reference.h goat.h
	$(NVCC) $(NVFLAGS) -I. bench/bench.cu $(BUILD)/goat.o $(BUILD)/reference.o -o $@

# the main demo
demo: $(BUILD)/demo
	./$(BUILD)/demo

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

# benchmark (GPU machine)
bench: $(BUILD)/bench
	./$(BUILD)/bench

clean:
	rm -rf $(BUILD)

.PHONY: all demo test test-asan test-gpu sanitize-gpu bench clean
