// RWKV-4 WKV CUDA kernels: one thread per (batch, channel), a sequential loop over time in registers.
// Same math as wkv_cpu.cpp (see there): every exp() argument is <= 0 thanks to a running maximum.
// The backward re-runs the forward, accumulating gu and gw (forward-mode d/dw), parking p_t, y_t and
// z_t in gk, gv and `scratch`; a reverse sweep then overwrites slot t with the gradient. Global memory
// rather than a shared-memory array of a compile-time Tmax, so any T works. Threads of a warp hold
// neighbouring channels, so every load and store is coalesced.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "wkv_cuda.h"

namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename F> __device__ __forceinline__ F from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// m = max(a, b), ea = e^{a-m}, eb = e^{b-m}: one of them is exactly 1, so one exp.
__device__ __forceinline__ void exp_pair(float a, float b, float& m, float& ea, float& eb) {
  const bool a_big = a >= b;
  const float e = expf(a_big ? b - a : a - b);
  m = a_big ? a : b;
  ea = a_big ? 1.0f : e;
  eb = a_big ? e : 1.0f;
}

template <typename F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                               const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                               F* __restrict__ y, float* __restrict__ s_aa, float* __restrict__ s_bb,
                               float* __restrict__ s_pp) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t b = idx / C, c = idx % C;
  const float wc = w[c], uc = u[c];
  float aa = s_aa[idx], bb = s_bb[idx], pp = s_pp[idx];
  for (int64_t t = 0, i = b * T * C + c; t < T; ++t, i += C) {
    const float kt = to_f(k[i]), vt = to_f(v[i]);
    float o, e1, e2;
    exp_pair(pp, uc + kt, o, e1, e2);
    y[i] = from_f<F>((e1 * aa + e2 * vt) / (e1 * bb + e2));
    exp_pair(wc + pp, kt, o, e1, e2);
    aa = e1 * aa + e2 * vt;
    bb = e1 * bb + e2;
    pp = o;
  }
  s_aa[idx] = aa;
  s_bb[idx] = bb;
  s_pp[idx] = pp;
}

template <typename F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                                const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                                const F* __restrict__ gy, const float* __restrict__ s_aa,
                                const float* __restrict__ s_bb, const float* __restrict__ s_pp, float* __restrict__ gk,
                                float* __restrict__ gv, float* __restrict__ zs, float* __restrict__ gw_out,
                                float* __restrict__ gu_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * C) return;
  const int64_t b = idx / C, c = idx % C, first = b * T * C + c;
  const float wc = w[c], uc = u[c];
  float aa = s_aa[idx], bb = s_bb[idx], pp = s_pp[idx];
  float dadw = 0.f, dbdw = 0.f, gw = 0.f, gu = 0.f;
  for (int64_t t = 0, i = first; t < T; ++t, i += C) {
    const float kt = to_f(k[i]), vt = to_f(v[i]), g = to_f(gy[i]);
    float o, e1, e2;
    exp_pair(pp, uc + kt, o, e1, e2);
    const float z = 1.0f / (e1 * bb + e2);  // e^o / D_t
    const float yt = (e1 * aa + e2 * vt) * z;
    gk[i] = o;
    gv[i] = yt;
    zs[i] = z;
    gu += g * (vt - yt) * e2 * z;
    gw += g * (dadw - yt * dbdw) * e1 * z;  // dA_t/dw = e^pp * dadw
    float o2;
    exp_pair(wc + pp, kt, o2, e1, e2);
    dadw = e1 * (aa + dadw);
    dbdw = e1 * (bb + dbdw);
    aa = e1 * aa + e2 * vt;
    bb = e1 * bb + e2;
    pp = o2;
  }
  // Reverse sweep: adjoints of the true states, dL/dA = ga e^q, dL/dB = gb e^q.
  float ga = 0.f, gb = 0.f, q = -1e38f;
  for (int64_t t = T - 1, i = first + (T - 1) * C; t >= 0; --t, i -= C) {
    const float kt = to_f(k[i]), vt = to_f(v[i]), g = to_f(gy[i]);
    const float o = gk[i], yt = gv[i], z = zs[i];
    const float gr = g * z * expf(uc + kt - o);  // g_t e^{u+k_t} / D_t
    const float ek = expf(kt + q);              // e^{k_t} e^q
    gv[i] = gr + ek * ga;
    gk[i] = gr * (vt - yt) + ek * (ga * vt + gb);
    float q2, d, eo;
    exp_pair(wc + q, -o, q2, d, eo);
    const float gz = g * z * eo;
    ga = d * ga + gz;
    gb = d * gb - gz * yt;
    q = q2;
  }
  gw_out[idx] = gw;
  gu_out[idx] = gu;
}

constexpr int kThreads = 128;

inline dim3 grid_for(int64_t B, int64_t C) { return dim3(static_cast<unsigned>((B * C + kThreads - 1) / kThreads)); }

template <typename F>
int forward_typed(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                  void* y, float* aa, float* bb, float* pp, cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  forward_kernel<F><<<grid_for(B, C), kThreads, 0, stream>>>(B, T, C, w, u, static_cast<const F*>(k),
                                                             static_cast<const F*>(v), static_cast<F*>(y), aa, bb, pp);
  return cudaGetLastError();
}

template <typename F>
int backward_typed(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                   const void* gy, const float* aa, const float* bb, const float* pp, float* gk, float* gv,
                   float* scratch, float* gw, float* gu, cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  backward_kernel<F><<<grid_for(B, C), kThreads, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(gy), aa, bb, pp, gk,
      gv, scratch, gw, gu);
  return cudaGetLastError();
}

}  // namespace

extern "C" int neox_wkv_forward(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                const void* k, const void* v, void* y, float* aa, float* bb, float* pp,
                                cudaStream_t stream) {
  switch (dtype) {
    case NEOX_WKV_F32: return forward_typed<float>(B, T, C, w, u, k, v, y, aa, bb, pp, stream);
    case NEOX_WKV_F16: return forward_typed<__half>(B, T, C, w, u, k, v, y, aa, bb, pp, stream);
    case NEOX_WKV_BF16: return forward_typed<__nv_bfloat16>(B, T, C, w, u, k, v, y, aa, bb, pp, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" int neox_wkv_backward(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                 const void* k, const void* v, const void* gy, const float* aa, const float* bb,
                                 const float* pp, float* gk, float* gv, float* scratch, float* gw, float* gu,
                                 cudaStream_t stream) {
  switch (dtype) {
    case NEOX_WKV_F32:
      return backward_typed<float>(B, T, C, w, u, k, v, gy, aa, bb, pp, gk, gv, scratch, gw, gu, stream);
    case NEOX_WKV_F16:
      return backward_typed<__half>(B, T, C, w, u, k, v, gy, aa, bb, pp, gk, gv, scratch, gw, gu, stream);
    case NEOX_WKV_BF16:
      return backward_typed<__nv_bfloat16>(B, T, C, w, u, k, v, gy, aa, bb, pp, gk, gv, scratch, gw, gu, stream);
    default: return cudaErrorInvalidValue;
  }
}
