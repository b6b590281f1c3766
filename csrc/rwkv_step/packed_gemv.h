// Matrix-vector products over weights packed for streaming, for batch 1 to 4 (float32, CPU).
//
// Why a packed layout: at batch 1 a gemv is pure weight bandwidth. A [O, I] row-major matrix read eight
// rows at a time is eight concurrent streams plus a horizontal sum per row; packed as tiles of 16 rows,
// [ceil(O / 16)][I][16] (zero-padded), the kernel reads one sequential stream, one 64-byte vector per input
// element, FMAs it with the broadcast input, and its 16 accumulators are the 16 outputs. Huge pages
// (Arena) spare the TLB over hundreds of MB. AVX-512 and AVX2 kernels are chosen at run time; a plain
// loop serves other CPUs.
//
// Exact bf16 storage: a float32 matrix whose every value has a zero low half (a model trained or released
// in bf16 and loaded as float32, as BlinkDL's RWKV-4 checkpoints are) is stored as those upper halves,
// half the bytes, and widened back in registers. The widening is exact and every kernel keeps the float32
// kernel's FMA order, so the outputs are bit-identical; one non-bf16 value keeps the matrix in float32.
// A bf16 tile interleaves input pairs (i, i+1) so that one unpack with zeros widens a whole register:
// within each 16-byte lane L (0..3) of a pair's 64 bytes, halves j = 0..3 are row 4L+j at input i and
// halves 4 + j the same rows at input i+1 (bf16_index). Columns are padded to an even count.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
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
  explicit Arena(int64_t bytes) {
    constexpr size_t kAlign = size_t(2) << 20;
    bytes_ = (static_cast<size_t>(std::max<int64_t>(bytes, 1)) + kAlign - 1) / kAlign * kAlign;
    data_ = static_cast<char*>(std::aligned_alloc(kAlign, bytes_));
    if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(data_, bytes_, MADV_HUGEPAGE);  // advice only: failure just means 4 KiB pages
#endif
    std::memset(data_, 0, bytes_);
  }
  ~Arena() { std::free(data_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  char* data() const { return data_; }

 private:
  char* data_ = nullptr;
  size_t bytes_ = 0;
};

// A matrix packed as tiles; `data` points into an Arena. bf16: the values are stored as their upper halves.
struct Packed {
  void* data = nullptr;
  int64_t rows = 0, cols = 0;
  bool bf16 = false;
  int64_t tiles() const { return (rows + kTile - 1) / kTile; }
  // Arena bytes for such a matrix (a multiple of 64, so the next one stays aligned).
  static int64_t bytes(int64_t rows, int64_t cols, bool bf16) {
    const int64_t t = (rows + kTile - 1) / kTile;
    const int64_t b = bf16 ? t * kTile * ((cols + 1) / 2 * 2) * 2 : t * kTile * cols * 4;
    return (b + 63) / 64 * 64;
  }
};

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float widen(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Offset, within a bf16 tile, of row r (0..15) at input i (see the layout above).
inline int64_t bf16_index(int64_t r, int64_t i) { return (i / 2) * 32 + (r / 4) * 8 + (i % 2) * 4 + r % 4; }

// Whether every value of w ([rows, cols], row stride ld) is a bf16 value, i.e. has a zero low half.
inline bool bf16_exact(const float* w, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < cols; ++i)
      if (float_bits(w[r * ld + i]) & 0xffffu) return false;
  return true;
}

// w: [rows, cols] row-major with row stride ld -> p.data (zeroed, holding Packed::bytes(rows, cols, p.bf16)).
inline void pack(const float* w, int64_t ld, Packed& p) {
  const int64_t I = p.cols, tile_halves = kTile * ((I + 1) / 2 * 2);
  for (int64_t t = 0; t < p.tiles(); ++t)
    for (int64_t r = 0; r < kTile && t * kTile + r < p.rows; ++r) {
      const float* src = w + (t * kTile + r) * ld;
      if (p.bf16) {
        uint16_t* dst = static_cast<uint16_t*>(p.data) + t * tile_halves;
        for (int64_t i = 0; i < I; ++i) dst[bf16_index(r, i)] = static_cast<uint16_t>(float_bits(src[i]) >> 16);
      } else {
        float* dst = static_cast<float*>(p.data) + t * kTile * I + r;
        for (int64_t i = 0; i < I; ++i) dst[i * kTile] = src[i];
      }
    }
}

// y[b][o] = sum_i W[o, i] x[b][i] for tiles [t0, t1); x rows have stride ldx, y rows stride ldy; only rows
// o < p.rows are written. B is the batch (1..kMaxBatch). Plain C++: the reference order for every kernel
// is i ascending into one accumulator per output (the SIMD kernels split i into chains, see theirs).
template <int B, bool BF16>
void gemv_generic(const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols, tile = BF16 ? kTile * ((I + 1) / 2 * 2) : kTile * I;
  for (int64_t t = t0; t < t1; ++t) {
    float acc[B][kTile] = {};
    float w[kTile];
    for (int64_t i = 0; i < I; ++i) {
      for (int64_t l = 0; l < kTile; ++l)
        w[l] = BF16 ? widen(static_cast<const uint16_t*>(p.data)[t * tile + bf16_index(l, i)])
                    : static_cast<const float*>(p.data)[t * tile + i * kTile + l];
      for (int b = 0; b < B; ++b) {
        const float xi = x[b * ldx + i];
        for (int64_t l = 0; l < kTile; ++l) acc[b][l] += w[l] * xi;
      }
    }
    const int64_t n = std::min(kTile, p.rows - t * kTile);
    for (int b = 0; b < B; ++b) std::copy(acc[b], acc[b] + n, y + b * ldy + t * kTile);
  }
}

}  // namespace neox_step

#include "gemv_x86.h"

namespace neox_step {

enum class Isa { kGeneric, kAvx2, kAvx512 };

inline bool isa_supported(Isa isa) {
#ifdef NEOX_X86
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
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

template <int B, bool BF16>
void gemv_tiles_bw(Isa isa, const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t t0,
                   int64_t t1) {
#ifdef NEOX_X86
  if (isa == Isa::kAvx512) return gemv_avx512<B, BF16>(p, x, ldx, y, ldy, t0, t1);
  if (isa == Isa::kAvx2) return gemv_avx2<B, BF16>(p, x, ldx, y, ldy, t0, t1);
#endif
  gemv_generic<B, BF16>(p, x, ldx, y, ldy, t0, t1);
}

template <int B>
void gemv_tiles_b(Isa isa, const Packed& p, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t t0,
                  int64_t t1) {
  if (p.bf16) return gemv_tiles_bw<B, true>(isa, p, x, ldx, y, ldy, t0, t1);
  gemv_tiles_bw<B, false>(isa, p, x, ldx, y, ldy, t0, t1);
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
