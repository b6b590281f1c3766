// RWKV-4 WKV on the CPU: forward and backward, threaded over (batch, channel block), vectorised over
// channels (C is innermost and contiguous, so one time step of a block is one SIMD sweep).
//
// Math (per channel; true numerator/denominator states A = aa*e^pp, B = bb*e^pp):
//   y_t = (A_t + e^{u+k_t} v_t) / (B_t + e^{u+k_t});  A_{t+1} = e^w A_t + e^{k_t} v_t;  B likewise with 1.
// Every exp() argument is <= 0 by construction (each is offset by a running maximum), so nothing
// overflows however large |k| gets. Backward: a forward re-run accumulates gu and gw (forward-mode
// d/dw of the state) and stores y_t, z_t = e^{p_t}/D_t and p_t; a reverse sweep carries the adjoints
// of A and B, scaled by a running exponent, to get gk and gv. No sequence-length limit.
//
// float math uses a branch-free exp that the compiler vectorises at any ISA level (built with
// -fno-trapping-math, which lets it if-convert the selects; results are unchanged); the float kernels
// are compiled for AVX-512, AVX2 and baseline x86-64 and chosen at load time (target_clones), so the
// cached build is portable (no -march=native). double (for gradcheck) uses std::exp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#if defined(__GNUC__)
#define NEOX_INLINE inline __attribute__((always_inline))  // so the ISA clones below compile the loops
#else
#define NEOX_INLINE inline
#endif

constexpr int64_t kMinBlock = 64;  // fewest channels per work item (a few SIMD sweeps)
constexpr float kMinExp = -1e38f;  // exponent of an empty state

// Value (not reference) min/max: std::max's reference result turns into a branch in loops.
template <typename T>
NEOX_INLINE T vmax(T a, T b) { return a > b ? a : b; }
template <typename T>
NEOX_INLINE T vmin(T a, T b) { return a < b ? a : b; }

// exp(x), ~1 ulp, branch-free so loops over it vectorise. Returns 0 below -87.3 (float underflow).
NEOX_INLINE float exp_fast(float x) {
  const float xc = vmin(vmax(x, -87.3f), 88.7f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;  // x - n*ln2 in two parts (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale * static_cast<float>(x >= -87.3f);  // a multiply, not a branch: keeps loops vectorisable
}
NEOX_INLINE double exp_fast(double x) { return std::exp(x); }

// m = max(a, b), ea = e^{a-m}, eb = e^{b-m} with one exp: one of the two is exactly 1.
template <typename T>
NEOX_INLINE void exp_pair(T a, T b, T& m, T& ea, T& eb) {
  const bool a_big = a >= b;
  const T e = exp_fast(a_big ? b - a : a - b);
  m = a_big ? a : b;
  ea = a_big ? T(1) : e;
  eb = a_big ? e : T(1);
}

template <typename T>
inline T min_exp() { return static_cast<T>(kMinExp); }

// One (batch, channel block) of the forward. k, v, y point at [T, C] rows of this batch, offset to c0;
// s_* point at this block's [n] slice of the state, updated in place.
template <typename T>
NEOX_INLINE void forward_block(int64_t Tn, int64_t C, int64_t n, const T* w, const T* u, const T* k, const T* v,
                          T* y, T* s_aa, T* s_bb, T* s_pp, T* scratch) {
  T *aa = scratch, *bb = scratch + n, *pp = scratch + 2 * n;  // [n] each
  for (int64_t c = 0; c < n; ++c) { aa[c] = s_aa[c]; bb[c] = s_bb[c]; pp[c] = s_pp[c]; }
  for (int64_t t = 0; t < Tn; ++t) {
    const T* kt = k + t * C;
    const T* vt = v + t * C;
    T* yt = y + t * C;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const T kc = kt[c], vc = vt[c];
      const T uk = u[c] + kc;
      T o, e1, e2;
      exp_pair(pp[c], uk, o, e1, e2);
      yt[c] = (e1 * aa[c] + e2 * vc) / (e1 * bb[c] + e2);
      const T wp = w[c] + pp[c];
      T o2;
      exp_pair(wp, kc, o2, e1, e2);
      aa[c] = e1 * aa[c] + e2 * vc;
      bb[c] = e1 * bb[c] + e2;
      pp[c] = o2;
    }
  }
  for (int64_t c = 0; c < n; ++c) { s_aa[c] = aa[c]; s_bb[c] = bb[c]; s_pp[c] = pp[c]; }
}

// One (batch, channel block) of the backward. gk/gv double as scratch: the forward sweep parks p_t in
// gk and y_t in gv (z_t in zs); the reverse sweep reads slot t before overwriting it with the gradient.
template <typename T>
NEOX_INLINE void backward_block(int64_t Tn, int64_t C, int64_t n, const T* w, const T* u, const T* k, const T* v,
                           const T* gy, const T* s_aa, const T* s_bb, const T* s_pp, T* gk, T* gv, T* zs, T* gw_out,
                           T* gu_out, T* scratch) {
  T *aa = scratch, *bb = scratch + n, *pp = scratch + 2 * n, *dadw = scratch + 3 * n, *dbdw = scratch + 4 * n;
  T *gw = scratch + 5 * n, *gu = scratch + 6 * n;  // [n] each
  for (int64_t c = 0; c < n; ++c) {
    aa[c] = s_aa[c]; bb[c] = s_bb[c]; pp[c] = s_pp[c];
    dadw[c] = dbdw[c] = gw[c] = gu[c] = T(0);
  }
  for (int64_t t = 0; t < Tn; ++t) {
    const int64_t off = t * C;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const T kt = k[off + c], vt = v[off + c], g = gy[off + c];
      const T uk = u[c] + kt;
      T o, e1, e2;
      exp_pair(pp[c], uk, o, e1, e2);
      const T z = T(1) / (e1 * bb[c] + e2);  // e^o / D_t
      const T yt = (e1 * aa[c] + e2 * vt) * z;
      gv[off + c] = yt;
      gk[off + c] = o;
      zs[off + c] = z;
      gu[c] += g * (vt - yt) * e2 * z;
      gw[c] += g * (dadw[c] - yt * dbdw[c]) * e1 * z;  // dA_t/dw = e^pp * dadw
      const T wp = w[c] + pp[c];
      T o2;
      exp_pair(wp, kt, o2, e1, e2);
      dadw[c] = e1 * (aa[c] + dadw[c]);
      dbdw[c] = e1 * (bb[c] + dbdw[c]);
      aa[c] = e1 * aa[c] + e2 * vt;
      bb[c] = e1 * bb[c] + e2;
      pp[c] = o2;
    }
  }
  // Reverse sweep. Adjoints of the true states after step t: dL/dA = ga * e^q, dL/dB = gb * e^q.
  T *ga = aa, *gb = bb, *q = pp;  // the forward state is spent: reuse its scratch
  for (int64_t c = 0; c < n; ++c) { ga[c] = gb[c] = T(0); q[c] = min_exp<T>(); }
  for (int64_t t = Tn - 1; t >= 0; --t) {
    const int64_t off = t * C;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) {
      const T kt = k[off + c], vt = v[off + c], g = gy[off + c];
      const T o = gk[off + c], yt = gv[off + c], z = zs[off + c];
      const T gr = g * z * exp_fast(u[c] + kt - o);  // g_t e^{u+k_t} / D_t
      const T ek = exp_fast(kt + q[c]);               // e^{k_t} * e^q  (<= ~1)
      gv[off + c] = gr + ek * ga[c];
      gk[off + c] = gr * (vt - yt) + ek * (ga[c] * vt + gb[c]);
      const T wq = w[c] + q[c];
      T q2, d, eo;
      exp_pair(wq, -o, q2, d, eo);
      const T gz = g * z * eo;  // g_t / D_t in the new scale
      ga[c] = d * ga[c] + gz;
      gb[c] = d * gb[c] - gz * yt;
      q[c] = q2;
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    gw_out[c] = gw[c];
    gu_out[c] = gu[c];
  }
}

// The float kernels, compiled per ISA and dispatched at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NEOX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NEOX_CLONES
#endif

NEOX_CLONES void forward_block_f32(int64_t Tn, int64_t C, int64_t n, const float* w, const float* u,
                                   const float* k, const float* v, float* y, float* aa, float* bb, float* pp,
                                   float* scratch) {
  forward_block<float>(Tn, C, n, w, u, k, v, y, aa, bb, pp, scratch);
}

NEOX_CLONES void backward_block_f32(int64_t Tn, int64_t C, int64_t n, const float* w, const float* u,
                                    const float* k, const float* v, const float* gy, const float* aa,
                                    const float* bb, const float* pp, float* gk, float* gv, float* zs, float* gw,
                                    float* gu, float* scratch) {
  backward_block<float>(Tn, C, n, w, u, k, v, gy, aa, bb, pp, gk, gv, zs, gw, gu, scratch);
}

inline void fwd(int64_t Tn, int64_t C, int64_t n, const float* w, const float* u, const float* k, const float* v,
                float* y, float* aa, float* bb, float* pp, float* scratch) {
  forward_block_f32(Tn, C, n, w, u, k, v, y, aa, bb, pp, scratch);
}
inline void fwd(int64_t Tn, int64_t C, int64_t n, const double* w, const double* u, const double* k,
                const double* v, double* y, double* aa, double* bb, double* pp, double* scratch) {
  forward_block<double>(Tn, C, n, w, u, k, v, y, aa, bb, pp, scratch);
}
inline void bwd(int64_t Tn, int64_t C, int64_t n, const float* w, const float* u, const float* k, const float* v,
                const float* gy, const float* aa, const float* bb, const float* pp, float* gk, float* gv, float* zs,
                float* gw, float* gu, float* scratch) {
  backward_block_f32(Tn, C, n, w, u, k, v, gy, aa, bb, pp, gk, gv, zs, gw, gu, scratch);
}
inline void bwd(int64_t Tn, int64_t C, int64_t n, const double* w, const double* u, const double* k,
                const double* v, const double* gy, const double* aa, const double* bb, const double* pp, double* gk,
                double* gv, double* zs, double* gw, double* gu, double* scratch) {
  backward_block<double>(Tn, C, n, w, u, k, v, gy, aa, bb, pp, gk, gv, zs, gw, gu, scratch);
}

// Work items are (b, channel block). Blocks are as wide as the thread count allows: each time step then
// reads whole contiguous rows (a narrow block strides a page per step and is several times slower).
// A grain keeps tiny RNN-mode calls (T=1) on one thread. fn(b, c0, n, scratch) gets `nscratch * n`
// elements of per-thread scratch.
template <typename T, typename F>
void for_each_block(int64_t B, int64_t Tn, int64_t C, int64_t nscratch, const F& fn) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits = std::max<int64_t>(1, std::min((threads + B - 1) / B, (C + kMinBlock - 1) / kMinBlock));
  const int64_t width = (C + splits - 1) / splits;
  const int64_t nblocks = (C + width - 1) / width;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, Tn * width));
  at::parallel_for(0, B * nblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch(static_cast<size_t>(nscratch * width));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nblocks, c0 = (i % nblocks) * width;
      fn(b, c0, std::min(width, C - c0), scratch.data());
    }
  });
}

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& aa, const at::Tensor& bb, const at::Tensor& pp) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "wkv_cpu: k and v must be [B, T, C] of one shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "wkv_cpu: k and v must share a dtype");
  const auto acc = w.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "wkv_cpu: w must be float32 or float64");
  for (const auto* t : {&w, &u, &k, &v, &aa, &bb, &pp}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "wkv_cpu: inputs must be contiguous CPU tensors");
  }
  for (const auto* t : {&u, &aa, &bb, &pp}) TORCH_CHECK(t->scalar_type() == acc, "wkv_cpu: u/state dtype != w's");
  TORCH_CHECK(acc == at::kFloat || k.scalar_type() == at::kDouble, "wkv_cpu: float64 math needs float64 k, v");
}

// (y [B,T,C] in v's dtype, aa, bb, pp [B,C] in the math dtype)
std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor aa,
                                    at::Tensor bb, at::Tensor pp) {
  check_inputs(w, u, k, v, aa, bb, pp);
  const int64_t B = k.size(0), Tn = k.size(1), C = k.size(2);
  const auto acc = w.scalar_type();
  at::Tensor kf = k.to(acc).contiguous(), vf = v.to(acc).contiguous();  // no copy when already acc
  at::Tensor y = at::empty({B, Tn, C}, k.options().dtype(acc));
  at::Tensor aa2 = aa.clone(), bb2 = bb.clone(), pp2 = pp.clone();
  AT_DISPATCH_FLOATING_TYPES(acc, "wkv_cpu_forward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    const scalar_t *pk = kf.data_ptr<scalar_t>(), *pv = vf.data_ptr<scalar_t>();
    scalar_t *py = y.data_ptr<scalar_t>(), *pa = aa2.data_ptr<scalar_t>(), *pb = bb2.data_ptr<scalar_t>(),
             *pp_ = pp2.data_ptr<scalar_t>();
    for_each_block<scalar_t>(B, Tn, C, 3, [&](int64_t b, int64_t c0, int64_t n, scalar_t* scratch) {
      const int64_t off = b * Tn * C + c0, s = b * C + c0;
      fwd(Tn, C, n, pw + c0, pu + c0, pk + off, pv + off, py + off, pa + s, pb + s, pp_ + s, scratch);
    });
  });
  return {y.to(v.scalar_type()), aa2, bb2, pp2};
}

// (gw [B,C], gu [B,C], gk [B,T,C], gv [B,T,C]), all in the math dtype; the caller sums gw, gu over B.
std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor aa,
                                     at::Tensor bb, at::Tensor pp, at::Tensor gy) {
  check_inputs(w, u, k, v, aa, bb, pp);
  TORCH_CHECK(gy.sizes() == k.sizes(), "wkv_cpu: gy must be [B, T, C]");
  const int64_t B = k.size(0), Tn = k.size(1), C = k.size(2);
  const auto acc = w.scalar_type();
  at::Tensor kf = k.to(acc).contiguous(), vf = v.to(acc).contiguous(), gf = gy.to(acc).contiguous();
  auto opts = k.options().dtype(acc);
  at::Tensor gk = at::empty({B, Tn, C}, opts), gv = at::empty({B, Tn, C}, opts), zs = at::empty({B, Tn, C}, opts);
  at::Tensor gw = at::empty({B, C}, opts), gu = at::empty({B, C}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "wkv_cpu_backward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    const scalar_t *pk = kf.data_ptr<scalar_t>(), *pv = vf.data_ptr<scalar_t>(), *pg = gf.data_ptr<scalar_t>();
    const scalar_t *pa = aa.data_ptr<scalar_t>(), *pb = bb.data_ptr<scalar_t>(), *pp_ = pp.data_ptr<scalar_t>();
    scalar_t *pgk = gk.data_ptr<scalar_t>(), *pgv = gv.data_ptr<scalar_t>(), *pz = zs.data_ptr<scalar_t>();
    scalar_t *pgw = gw.data_ptr<scalar_t>(), *pgu = gu.data_ptr<scalar_t>();
    for_each_block<scalar_t>(B, Tn, C, 7, [&](int64_t b, int64_t c0, int64_t n, scalar_t* scratch) {
      const int64_t off = b * Tn * C + c0, s = b * C + c0;
      bwd(Tn, C, n, pw + c0, pu + c0, pk + off, pv + off, pg + off, pa + s, pb + s, pp_ + s, pgk + off, pgv + off,
          pz + off, pgw + s, pgu + s, scratch);
    });
  });
  return {gw, gu, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv_forward, "RWKV-4 WKV forward (CPU)");
  m.def("backward", &wkv_backward, "RWKV-4 WKV backward (CPU)");
}
