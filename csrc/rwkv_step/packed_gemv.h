// Matrix-vector products over weights packed for streaming, for batch 1 to 4 (float32, CPU).
//
// Why a packed layout: at batch 1 a gemv is pure weight bandwidth. A [O, I] row-major matrix read eight
// rows at a time is eight concurrent streams plus a horizontal sum per row; packed as tiles of 16 rows,
// [ceil(O / 16)][I][16] (zero-padded), the kernel reads one sequential stream, one 64-byte vector per input
// element, FMAs it with the broadcast input, and its 16 accumulators are the 16 outputs. Huge pages
// (Arena) spare the TLB over hundreds of MB. AVX-512 and AVX2 kernels are chosen at run time; a plain
// loop serves other CPUs.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NEOX_X86 1
#endif

namespace neox_step {

constexpr int64_t kTile = 16;    // output rows per tile
constexpr int64_t kMaxBatch = 4;  // rows of input handled per pass over the weights

// One 2 MiB-aligned allocation, advised to use transparent huge pages where the OS allows it.
class Arena {
 public:
  explicit Arena(int64_t floats) {
    constexpr size_t kAlign = size_t(2) << 20;
    bytes_ = (static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float) + kAlign - 1) / kAlign * kAlign;
    data_ = static_cast<float*>(std::aligned_alloc(kAlign, bytes_));
    if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(data_, bytes_, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
    std::memset(data_, 0, bytes_);
  }
  ~Arena() { std::free(data_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  size_t bytes_ = 0;
};

// A matrix packed as tiles; `data` points into an Arena.
struct Packed {
  float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t tiles() const { return (rows + kTile - 1) / kTile; }
  static int64_t floats(int64_t rows, int64_t cols) { return (rows + kTile - 1) / kTile * kTile * cols; }
};

// w: [rows, cols] row-major with row stride ld -> p.data (which must hold Packed::floats(rows, cols)).
inline void pack(const float* w, int64_t ld, Packed& p) {
  for (int64_t t = 0; t < p.tiles(); ++t)
    for (int64_t r = 0; r < kTile && t * kTile + r < p.rows; ++r) {
      const float* src = w + (t * kTile + r) * ld;
      float* dst = p.data + t * kTile * p.cols + r;
      for (int64_t i = 0; i < p.cols; ++i) dst[i * kTile] = src[i];
    }
}

// y[b][o] = sum_i W[o, i] x[b][i] for tiles [t0, t1); x rows have stride ldx, y rows stride ldy; only rows
// o < p.rows are written. B is the batch (1..kMaxBatch).
template <int B>
void gemv_generic(const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols;
  for (int64_t t = t0; t < t1; ++t) {
    const float* w = p.data + t * kTile * I;
    float acc[B][kTile] = {};
    for (int64_t i = 0; i < I; ++i)
      for (int b = 0; b < B; ++b) {
        const float xi = x[b * ldx + i];
        for (int64_t l = 0; l < kTile; ++l) acc[b][l] += w[i * kTile + l] * xi;
      }
    const int64_t n = std::min(kTile, p.rows - t * kTile);
    for (int b = 0; b < B; ++b) std::copy(acc[b], acc[b] + n, y + b * ldy + t * kTile);
  }
}

#ifdef NEOX_X86
template <int B>
__attribute__((target("avx512f"))) void gemv_avx512(const Packed& p, const float* x, int64_t ldx, float* y,
                                                   int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols, I4 = I & ~int64_t(3);
  for (int64_t t = t0; t < t1; ++t) {
    const float* w = p.data + t * kTile * I;
    __m512 acc[B][4];  // four chains per row hide the FMA latency
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) acc[b][c] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i < I4; i += 4) {
      const __m512 w0 = _mm512_load_ps(w + i * kTile), w1 = _mm512_load_ps(w + (i + 1) * kTile);
      const __m512 w2 = _mm512_load_ps(w + (i + 2) * kTile), w3 = _mm512_load_ps(w + (i + 3) * kTile);
      for (int b = 0; b < B; ++b) {
        const float* xb = x + b * ldx + i;
        acc[b][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xb[0]), acc[b][0]);
        acc[b][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xb[1]), acc[b][1]);
        acc[b][2] = _mm512_fmadd_ps(w2, _mm512_set1_ps(xb[2]), acc[b][2]);
        acc[b][3] = _mm512_fmadd_ps(w3, _mm512_set1_ps(xb[3]), acc[b][3]);
      }
    }
    for (; i < I; ++i)
      for (int b = 0; b < B; ++b)
        acc[b][0] = _mm512_fmadd_ps(_mm512_load_ps(w + i * kTile), _mm512_set1_ps(x[b * ldx + i]), acc[b][0]);
    const int64_t n = std::min(kTile, p.rows - t * kTile);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    for (int b = 0; b < B; ++b) {
      const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3]));
      _mm512_mask_storeu_ps(y + b * ldy + t * kTile, mask, s);
    }
  }
}

template <int B>
__attribute__((target("avx2,fma"))) void gemv_avx2(const Packed& p, const float* x, int64_t ldx, float* y,
                                                  int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols;
  for (int64_t t = t0; t < t1; ++t) {
    const float* w = p.data + t * kTile * I;
    __m256 acc[B][2][2];  // [row][chain][half of the tile]
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 2; ++c) acc[b][c][0] = acc[b][c][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < I; ++i) {
      const int c = static_cast<int>(i & 1);
      const __m256 lo = _mm256_load_ps(w + i * kTile), hi = _mm256_load_ps(w + i * kTile + 8);
      for (int b = 0; b < B; ++b) {
        const __m256 xi = _mm256_set1_ps(x[b * ldx + i]);
        acc[b][c][0] = _mm256_fmadd_ps(lo, xi, acc[b][c][0]);
        acc[b][c][1] = _mm256_fmadd_ps(hi, xi, acc[b][c][1]);
      }
    }
    const int64_t n = std::min(kTile, p.rows - t * kTile);
    for (int b = 0; b < B; ++b) {
      alignas(32) float out[kTile];
      _mm256_store_ps(out, _mm256_add_ps(acc[b][0][0], acc[b][1][0]));
      _mm256_store_ps(out + 8, _mm256_add_ps(acc[b][0][1], acc[b][1][1]));
      std::copy(out, out + n, y + b * ldy + t * kTile);
    }
  }
}
#endif

enum class Isa { kGeneric, kAvx2, kAvx512 };

inline bool isa_supported(Isa isa) {
#ifdef NEOX_X86
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kGeneric;
}

inline Isa detect_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (isa_supported(isa)) return isa;
  return Isa::kGeneric;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "generic";
}

template <int B>
void gemv_tiles_b(Isa isa, const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t t0,
                  int64_t t1) {
#ifdef NEOX_X86
  if (isa == Isa::kAvx512) return gemv_avx512<B>(p, x, ldx, y, ldy, t0, t1);
  if (isa == Isa::kAvx2) return gemv_avx2<B>(p, x, ldx, y, ldy, t0, t1);
#endif
  gemv_generic<B>(p, x, ldx, y, ldy, t0, t1);
}

// Tiles [t0, t1) of y = W x for `batch` (1..kMaxBatch) input rows.
inline void gemv_tiles(Isa isa, int batch, const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy,
                       int64_t t0, int64_t t1) {
  switch (batch) {
    case 1: return gemv_tiles_b<1>(isa, p, x, ldx, y, ldy, t0, t1);
    case 2: return gemv_tiles_b<2>(isa, p, x, ldx, y, ldy, t0, t1);
    case 3: return gemv_tiles_b<3>(isa, p, x, ldx, y, ldy, t0, t1);
    default: return gemv_tiles_b<4>(isa, p, x, ldx, y, ldy, t0, t1);
  }
}

}  // namespace neox_step
