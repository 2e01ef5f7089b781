// tests/test_main.cpp: doctest's main for the test programs, plus the "GPU required?" switch.
//
// The GPU test program calls goat_test_gpu_available() (tests/test_gpu*.cu) through a weak hook: when there is
// no CUDA device it checks the library's no-device answer, then exits with 77, which `make test` reports as
// SKIPPED (never as passed). With --require-gpu (used by `make test-gpu`) no device is a failure instead.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <vector>

// Defined by the GPU test program only: returns false when no CUDA device can be used; and, for that case, checks
// that the library says so (one code-3 message) instead of failing somewhere inside.
__attribute__((weak)) bool goat_test_gpu_available();
__attribute__((weak)) bool goat_test_no_device_contract();

int main(int argc, char** argv) {
    // line by line into a redirected log (doctest's std::cout shares stdio's buffer), so that a run stopped by a
    // time limit leaves every line it printed
    std::setvbuf(stdout, nullptr, _IOLBF, 0);
    bool require_gpu = false;
    std::vector<char*> args;
    for (int i = 0; i < argc; ++i) {
        if (std::strcmp(argv[i], "--require-gpu") == 0) require_gpu = true;
        else args.push_back(argv[i]);
    }
    if (goat_test_gpu_available && !goat_test_gpu_available()) {
        if (require_gpu) {
            std::printf("no CUDA device, and --require-gpu was given: FAILED\n");
            return 1;
        }
        if (goat_test_no_device_contract && !goat_test_no_device_contract()) return 1;
        std::printf("no CUDA device: GPU tests skipped\n");
        return 77;
    }
    doctest::Context ctx((int)args.size(), args.data());
    return ctx.run();
}
