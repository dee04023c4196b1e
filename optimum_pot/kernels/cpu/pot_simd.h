// Helpers shared by the CPU kernels (pot_cpu.cpp: fp32 activations, pot_i8.cpp: int8 activations).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define POT_AVX2 1
#else
#define POT_AVX2 0
#endif

namespace pot {

constexpr int64_t kChunk = 64;  // codes per chunk: 8 lanes x 8 positions

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE fp16 -> fp32 without F16C (subnormals, inf and nan included).
inline float half_to_float(uint16_t h) {
#if POT_AVX2
  return _cvtsh_ss(h);
#else
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) {
    float v = float(mant) * (1.0f / 16777216.0f);  // mant * 2^-24, exact
    return u2f(f2u(v) | sign);
  }
  if (exp == 31) return u2f(sign | 0x7f800000u | (mant << 13));
  return u2f(sign | ((exp + 112) << 23) | (mant << 13));
#endif
}

#if POT_AVX2

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum_g z[g] * xg[g]: the offset's share of one output (fp16 offsets, 8 groups per step), for both kernels.
inline float offset_dot(const uint16_t* z, const float* xg, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + g))),
                          _mm256_loadu_ps(xg + g), acc);
  float s = hsum(acc);
  for (; g < G; ++g) s += half_to_float(z[g]) * xg[g];
  return s;
}

// Where the loads of chunk c of a row read from: the row itself, or near its end `tmp` (32 bytes) holding the
// chunk's remaining bytes zero-padded, so no load reads past the row. A chunk is 8*BITS bytes; the loads read 16
// (2-bit), 28 (3-bit: two 16-byte loads at 0 and 12) or 32 (4-bit) bytes from the returned pointer.
template <int BITS>
inline const uint8_t* chunk_bytes(const uint8_t* row, int64_t row_bytes, int64_t c, uint8_t* tmp) {
  constexpr int64_t reads = BITS == 2 ? 16 : (BITS == 3 ? 28 : 32);
  const int64_t off = c * 8 * BITS;
  if (off + reads <= row_bytes) return row + off;
  std::memset(tmp, 0, 32);
  std::memcpy(tmp, row + off, size_t(std::min<int64_t>(reads, row_bytes - off)));
  return tmp;
}

// A 3-bit chunk's 24 bytes as two 128-bit halves: bytes 0-11 (codes 0-31) low, bytes 12-23 (codes 32-63) high.
inline __m256i load_halves3(const uint8_t* src) {
  return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(src + 12), reinterpret_cast<const __m128i*>(src));
}

// Loads chunk c of a row so that 32-bit lane l holds codes 8l..8l+7 at bits [p*BITS, (p+1)*BITS).
template <int BITS>
inline __m256i load_chunk(const uint8_t* row, int64_t row_bytes, int64_t c) {
  alignas(32) uint8_t tmp[32];
  const uint8_t* src = chunk_bytes<BITS>(row, row_bytes, c, tmp);
  if (BITS == 4) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if (BITS == 2) return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i spread = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,  //
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  return _mm256_shuffle_epi8(load_halves3(src), spread);
}

#endif  // POT_AVX2

}  // namespace pot
