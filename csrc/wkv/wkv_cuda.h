// Plain C ABI of the RWKV-4 WKV CUDA kernels (wkv_cuda.cu): raw pointers, sizes and a stream; no torch.
//
// Layout: k, v, y, gy are [B, T, C] contiguous in the input dtype (NEOX_WKV_F32 / F16 / BF16); w, u
// are [C] float; the state aa, bb, pp is [B, C] float (updated in place: pass a copy of the initial
// state and get the final one back). Math is float32 whatever the input dtype. The backward writes
// float gk, gv [B, T, C] and per-sequence gw, gu [B, C] (the caller sums over B); it needs `scratch`,
// float [B, T, C]. Every function returns a cudaError_t (0 = cudaSuccess). No sequence-length limit.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { NEOX_WKV_F32 = 0, NEOX_WKV_F16 = 1, NEOX_WKV_BF16 = 2 };

int neox_wkv_forward(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                     const void* v, void* y, float* aa, float* bb, float* pp, cudaStream_t stream);

int neox_wkv_backward(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k,
                      const void* v, const void* gy, const float* aa, const float* bb, const float* pp, float* gk,
                      float* gv, float* scratch, float* gw, float* gu, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
