// The AVX-512 and AVX2 tile kernels of packed_gemv.h (compiled for those targets, chosen at run time).
//
// Each float32 kernel splits the inputs into chains (AVX-512: i % 4, AVX2: i % 2; the tail of an input
// count not divisible by 4 goes to chain 0) to hide the FMA latency; the bf16 kernel of the same ISA
// keeps exactly those chains and that order, so the two storages give bit-identical outputs. The bf16
// kernels also prefetch kPrefetchBytes ahead: widening costs a few instructions per value, which shrinks
// how far ahead the out-of-order core runs, and without the prefetch a core streams ~30% fewer bytes/s.
#pragma once

#ifdef NEOX_X86

namespace neox_step {

constexpr int64_t kPrefetchBytes = 2048;

template <int B>
__attribute__((target("avx512f"))) inline void store_tile_avx512(__m512 (&acc)[B][4], float* y, int64_t ldy,
                                                                 int64_t t, int64_t rows) {
  const int64_t n = std::min(kTile, rows - t * kTile);
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  for (int b = 0; b < B; ++b) {
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]), _mm512_add_ps(acc[b][2], acc[b][3]));
    _mm512_mask_storeu_ps(y + b * ldy + t * kTile, mask, s);
  }
}

// acc[b][c] += w_c * x[b][i + c] for the four inputs i..i+3 of every row b (chain c = input i + c).
template <int B>
__attribute__((target("avx512f"), always_inline)) inline void fma4_avx512(__m512 (&acc)[B][4], __m512 w0, __m512 w1,
                                                                         __m512 w2, __m512 w3, const float* x,
                                                                         int64_t ldx, int64_t i) {
  for (int b = 0; b < B; ++b) {
    const float* xb = x + b * ldx + i;
    acc[b][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xb[0]), acc[b][0]);
    acc[b][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xb[1]), acc[b][1]);
    acc[b][2] = _mm512_fmadd_ps(w2, _mm512_set1_ps(xb[2]), acc[b][2]);
    acc[b][3] = _mm512_fmadd_ps(w3, _mm512_set1_ps(xb[3]), acc[b][3]);
  }
}

template <int B, bool BF16>
__attribute__((target("avx512f,avx512bw"))) void gemv_avx512(const Packed& p, const float* x, int64_t ldx, float* y,
                                                             int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols, I4 = I & ~int64_t(3);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t t = t0; t < t1; ++t) {
    __m512 acc[B][4];
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 4; ++c) acc[b][c] = _mm512_setzero_ps();
    if (BF16) {
      const uint16_t* w = static_cast<const uint16_t*>(p.data) + t * kTile * ((I + 1) / 2 * 2);
      int64_t i = 0;
      for (; i < I4; i += 4) {  // two input pairs: 128 bytes, two registers, four inputs
        const char* line = reinterpret_cast<const char*>(w + i * kTile);
        _mm_prefetch(line + kPrefetchBytes, _MM_HINT_T0);
        _mm_prefetch(line + kPrefetchBytes + 64, _MM_HINT_T0);
        const __m512i v0 = _mm512_load_si512(w + i * kTile), v1 = _mm512_load_si512(w + (i + 2) * kTile);
        const __m512 w0 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v0));
        const __m512 w1 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v0));
        const __m512 w2 = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v1));
        const __m512 w3 = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v1));
        fma4_avx512<B>(acc, w0, w1, w2, w3, x, ldx, i);
      }
      for (; i < I; i += 2) {  // the tail, all into chain 0 as in the float32 kernel
        const __m512i v = _mm512_load_si512(w + i * kTile);
        const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, v));
        const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, v));
        for (int b = 0; b < B; ++b) {
          acc[b][0] = _mm512_fmadd_ps(lo, _mm512_set1_ps(x[b * ldx + i]), acc[b][0]);
          if (i + 1 < I) acc[b][0] = _mm512_fmadd_ps(hi, _mm512_set1_ps(x[b * ldx + i + 1]), acc[b][0]);
        }
      }
    } else {
      const float* w = static_cast<const float*>(p.data) + t * kTile * I;
      int64_t i = 0;
      for (; i < I4; i += 4) {
        const __m512 w0 = _mm512_load_ps(w + i * kTile), w1 = _mm512_load_ps(w + (i + 1) * kTile);
        const __m512 w2 = _mm512_load_ps(w + (i + 2) * kTile), w3 = _mm512_load_ps(w + (i + 3) * kTile);
        fma4_avx512<B>(acc, w0, w1, w2, w3, x, ldx, i);
      }
      for (; i < I; ++i)
        for (int b = 0; b < B; ++b)
          acc[b][0] = _mm512_fmadd_ps(_mm512_load_ps(w + i * kTile), _mm512_set1_ps(x[b * ldx + i]), acc[b][0]);
    }
    store_tile_avx512<B>(acc, y, ldy, t, p.rows);
  }
}

template <int B, bool BF16>
__attribute__((target("avx2,fma"))) void gemv_avx2(const Packed& p, const float* x, int64_t ldx, float* y,
                                                  int64_t ldy, int64_t t0, int64_t t1) {
  const int64_t I = p.cols;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t t = t0; t < t1; ++t) {
    __m256 acc[B][2][2];  // [row][chain i % 2][half of the tile]
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < 2; ++c) acc[b][c][0] = acc[b][c][1] = _mm256_setzero_ps();
    if (BF16) {
      const uint16_t* w = static_cast<const uint16_t*>(p.data) + t * kTile * ((I + 1) / 2 * 2);
      for (int64_t i = 0; i < I; i += 2) {  // one input pair: rows 0-7 in the first 32 bytes, 8-15 next
        _mm_prefetch(reinterpret_cast<const char*>(w + i * kTile) + kPrefetchBytes, _MM_HINT_T0);
        const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + i * kTile));
        const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(w + i * kTile + 16));
        const __m256 lo0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v0));  // input i, rows 0-7
        const __m256 lo1 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v1));  // input i, rows 8-15
        const __m256 hi0 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v0));  // input i + 1
        const __m256 hi1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v1));
        for (int b = 0; b < B; ++b) {
          const __m256 xi = _mm256_set1_ps(x[b * ldx + i]);
          acc[b][0][0] = _mm256_fmadd_ps(lo0, xi, acc[b][0][0]);
          acc[b][0][1] = _mm256_fmadd_ps(lo1, xi, acc[b][0][1]);
          if (i + 1 < I) {
            const __m256 xj = _mm256_set1_ps(x[b * ldx + i + 1]);
            acc[b][1][0] = _mm256_fmadd_ps(hi0, xj, acc[b][1][0]);
            acc[b][1][1] = _mm256_fmadd_ps(hi1, xj, acc[b][1][1]);
          }
        }
      }
    } else {
      const float* w = static_cast<const float*>(p.data) + t * kTile * I;
      for (int64_t i = 0; i < I; ++i) {
        const int c = static_cast<int>(i & 1);
        const __m256 lo = _mm256_load_ps(w + i * kTile), hi = _mm256_load_ps(w + i * kTile + 8);
        for (int b = 0; b < B; ++b) {
          const __m256 xi = _mm256_set1_ps(x[b * ldx + i]);
          acc[b][c][0] = _mm256_fmadd_ps(lo, xi, acc[b][c][0]);
          acc[b][c][1] = _mm256_fmadd_ps(hi, xi, acc[b][c][1]);
        }
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

}  // namespace neox_step

#endif  // NEOX_X86
