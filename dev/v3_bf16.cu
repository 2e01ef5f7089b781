// dev/v3_bf16.cu: work in progress, the bf16 tensor-core kernels (v3) of goat.cu. Included by goat.cu in its
// "v3 bf16 mma" section; will be folded into goat.cu once done. Not compiled on its own.
//
// Contract with goat.cu (which includes this file after its utilities section, so goat_status,
// GOAT_CUDA_CHECK, GOAT_LAUNCH_CHECK and goat_log_prior are visible here):
//   static bool v3_supports(const GoatParams& p);                 // dtype bf16 and d in {64, 128}
//   static size_t v3_workspace_bytes(const GoatParams& p);        // backward scratch this version needs
//   static GoatStatus v3_forward(const GoatParams& p, cudaStream_t stream);
//   static GoatStatus v3_backward(const GoatParams& p, void* workspace, cudaStream_t stream);
// Arguments have been validated by the caller (pointers non-null, sizes positive) before these are called.

static bool v3_supports(const GoatParams& p) { return p.dtype == GOAT_BF16 && (p.d == 64 || p.d == 128); }
static size_t v3_workspace_bytes(const GoatParams&) { return 0; }
static GoatStatus v3_forward(const GoatParams&, cudaStream_t) {
    return goat_status(2, "v3 (bf16 tensor cores) is not implemented yet");
}
static GoatStatus v3_backward(const GoatParams&, void*, cudaStream_t) {
    return goat_status(2, "v3 (bf16 tensor cores) is not implemented yet");
}
