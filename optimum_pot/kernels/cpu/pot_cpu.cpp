// CPU kernels for the packed PoT linear (see docs/cpu_kernel.md).
//
// Weights are read straight from the canonical layout (optimum_pot/format/packing.py): each row is a little-endian
// bit stream of `bits`-bit codes, code = sign << (bits-1) | e, value = s * (-1)^sign * 2^-e (the all-ones e is 0
// with zero_level). No repacking, no per-weight multiply:
//
//  * Per group, an 8-entry table of decoded values is built by exponent arithmetic on the fp32 bits of the scale:
//    bits(s) - (e << 23) is s * 2^-e exactly (fp16 scales are >= 2^-24, so s * 2^-7 >= 2^-31 never underflows the
//    fp32 exponent); the sign is an XOR of bit 31; the zero code and a zero scale are masked to 0.
//  * A 64-code chunk of a row is loaded so that 32-bit lane l holds codes 8l..8l+7 (4-bit: 32 bytes as they are;
//    3-bit: 3 bytes per lane via a byte shuffle; 2-bit: 2 bytes per lane). Shifting the lanes right by p*bits puts
//    code 8l+p in the low bits, and _mm256_permutevar8x32_ps (which only reads the low 3 bits of each index)
//    looks its value up: 2 ops per 8 weights for 2/3-bit (the table holds signed values), 4-bit adds the sign XOR.
//  * The activation is permuted once per call into the same "chunk order" (index 64c + 8p + l holds x[64c+8l+p]),
//    so the decoded vector for position p multiplies one contiguous 8-float load: one FMA per 8 weights, fp32
//    accumulation.
//
// Without AVX2/FMA/F16C (or for group sizes that are not multiples of 64) a portable path decodes each row with
// the same table (scalar) and takes dot products. Threads (pot_pool.h) split output rows.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pot_pool.h"
#include "pot_simd.h"

namespace {

using pot::f2u;
using pot::half_to_float;
using pot::kChunk;
using pot::u2f;
#if POT_AVX2
using pot::hsum;
using pot::load_chunk;
#endif

// Decoded value of every code of one group: s * (-1)^sign * 2^-e by exponent arithmetic (no multiply).
inline void group_table(uint16_t h, int bits, bool zero_level, float* table) {
  const uint32_t sb = f2u(half_to_float(h));
  const bool zero_scale = (sb & 0x7fffffffu) == 0;
  const int n_e = 1 << (bits - 1);
  for (int c = 0; c < (1 << bits); ++c) {
    const int e = c & (n_e - 1), sign = c >> (bits - 1);
    const bool zero = zero_scale || (zero_level && e == n_e - 1);
    table[c] = zero ? 0.0f : u2f((sb - (uint32_t(e) << 23)) ^ (uint32_t(sign) << 31));
  }
}

inline int code_at(const uint8_t* row, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t byte = bit >> 3;
  const int shift = int(bit & 7);
  uint32_t word = row[byte];
  if (shift + bits > 8) word |= uint32_t(row[byte + 1]) << 8;  // a 3-bit code may straddle two bytes
  return int((word >> shift) & ((1u << bits) - 1));
}

// Portable decode of one row to natural order (out[k] for k < K).
void decode_row_scalar(const uint8_t* row, const uint16_t* srow, int64_t K, int64_t group_size, int bits,
                       bool zero_level, float* out) {
  float table[16];
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += group_size, ++g) {
    group_table(srow[g], bits, zero_level, table);
    const int64_t k1 = std::min(K, k0 + group_size);
    for (int64_t k = k0; k < k1; ++k) out[k] = table[code_at(row, k, bits)];
  }
}

float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if POT_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  float lanes[8];
  _mm256_storeu_ps(lanes, acc0);
  float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
#else
  float s = 0.0f;
#endif
  float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) p[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) p[0] += a[i] * b[i];
  return s + ((p[0] + p[1]) + (p[2] + p[3]));
}

#if POT_AVX2

// The 8-entry permute table of a group. 4-bit: magnitudes by e (the sign is XORed per weight); 3-bit: signed
// values by code; 2-bit: signed values by code, repeated (the index's bit 2 belongs to the next code).
template <int BITS>
inline __m256 lut8(uint16_t h, bool zero_level) {
  float t[16];
  group_table(h, BITS, zero_level, t);
  if (BITS == 2)
    for (int c = 4; c < 8; ++c) t[c] = t[c - 4];
  return _mm256_loadu_ps(t);
}

// Decoded weights of position p of a chunk (lane l = code 8l+p).
template <int BITS, int P>
inline __m256 decode_pos(__m256i v, __m256 lut) {
  const __m256 mag = _mm256_permutevar8x32_ps(lut, _mm256_srli_epi32(v, P * BITS));
  if (BITS != 4) return mag;
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(v, 28 - 4 * P), _mm256_set1_epi32(int(0x80000000u)));
  return _mm256_xor_ps(mag, _mm256_castsi256_ps(sign));
}

// MB activation rows against one weight row; A independent accumulators per activation row hide FMA latency.
template <int BITS, int MB>
void row_dot_fast(const uint8_t* row, int64_t row_bytes, const uint16_t* srow, int64_t n_groups, int64_t cpg,
                  int64_t n_chunks, bool zero_level, const float* xp, int64_t xstride, float* out) {
  constexpr int A = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  __m256 acc[MB][A];
  for (int m = 0; m < MB; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t g = 0; g < n_groups; ++g) {
    const __m256 lut = lut8<BITS>(srow[g], zero_level);
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = load_chunk<BITS>(row, row_bytes, c);
      const float* xc = xp + c * kChunk;
#define POT_STEP(P)                                                             \
  {                                                                             \
    const __m256 w = decode_pos<BITS, P>(v, lut);                               \
    for (int m = 0; m < MB; ++m)                                                \
      acc[m][P % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + m * xstride + P * 8), acc[m][P % A]); \
  }
      POT_STEP(0) POT_STEP(1) POT_STEP(2) POT_STEP(3) POT_STEP(4) POT_STEP(5) POT_STEP(6) POT_STEP(7)
#undef POT_STEP
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[m][0];
    for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[m][a]);
    out[m] = hsum(s);
  }
}

// 4-bit: the per-weight decode is a byte-table lookup (pshufb, 16 entries = every 4-bit code). A unit value
// +-2^-e is exactly the bf16 word sign << 15 | (127 - e) << 7, so two table bytes per code give it and a zero
// interleave widens it to fp32; the group's scale is applied once per group (one multiply per group).
// Chunk position q*8 + i holds code chunk_code4(q, i).
inline int chunk_code4(int q, int i) {
  return 2 * (16 * (i >> 2) + 8 * ((q >> 1) & 1) + 4 * (q & 1) + (i & 3)) + (q >> 2);
}

inline __m256i unit_table4(bool zero_level, bool high) {
  alignas(32) uint8_t t[32];
  for (int c = 0; c < 16; ++c) {
    const int e = c & 7, sign = c >> 3;
    const int word = (zero_level && e == 7) ? 0 : (sign << 15) | ((127 - e) << 7);
    t[c] = t[c + 16] = uint8_t(high ? word >> 8 : word & 0xff);
  }
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
}

template <int MB>
void row_dot_fast4(const uint8_t* row, int64_t row_bytes, const uint16_t* srow, int64_t n_groups, int64_t cpg,
                   int64_t n_chunks, const __m256i tlo, const __m256i thi, const float* xp, int64_t xstride,
                   float* out) {
  constexpr int A = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < n_groups; ++g) {
    __m256 acc[MB][A];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = load_chunk<4>(row, row_bytes, c);
      const __m256i even = _mm256_and_si256(v, low4), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i el = _mm256_shuffle_epi8(tlo, even), eh = _mm256_shuffle_epi8(thi, even);
      const __m256i ol = _mm256_shuffle_epi8(tlo, odd), oh = _mm256_shuffle_epi8(thi, odd);
      const __m256i words[4] = {_mm256_unpacklo_epi8(el, eh), _mm256_unpackhi_epi8(el, eh),
                                _mm256_unpacklo_epi8(ol, oh), _mm256_unpackhi_epi8(ol, oh)};  // bf16
      const float* xc = xp + c * kChunk;
#define POT_STEP4(Q)                                                                                        \
  {                                                                                                         \
    const __m256i wq = (Q & 1) ? _mm256_unpackhi_epi16(zero, words[Q / 2]) : _mm256_unpacklo_epi16(zero, words[Q / 2]); \
    const __m256 w = _mm256_castsi256_ps(wq);                                                               \
    for (int m = 0; m < MB; ++m)                                                                            \
      acc[m][Q % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + m * xstride + Q * 8), acc[m][Q % A]);         \
  }
      POT_STEP4(0) POT_STEP4(1) POT_STEP4(2) POT_STEP4(3) POT_STEP4(4) POT_STEP4(5) POT_STEP4(6) POT_STEP4(7)
#undef POT_STEP4
    }
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(srow[g]));
    for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      total[m] = _mm256_fmadd_ps(s, sum, total[m]);  // the one multiply per group
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = hsum(total[m]);
}

template <int BITS>
void decode_row_fast(const uint8_t* row, int64_t row_bytes, const uint16_t* srow, int64_t n_groups, int64_t cpg,
                     int64_t n_chunks, bool zero_level, float* out) {
  for (int64_t g = 0; g < n_groups; ++g) {
    const __m256 lut = lut8<BITS>(srow[g], zero_level);
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = load_chunk<BITS>(row, row_bytes, c);
      float* o = out + c * kChunk;
      _mm256_storeu_ps(o + 0, decode_pos<BITS, 0>(v, lut));
      _mm256_storeu_ps(o + 8, decode_pos<BITS, 1>(v, lut));
      _mm256_storeu_ps(o + 16, decode_pos<BITS, 2>(v, lut));
      _mm256_storeu_ps(o + 24, decode_pos<BITS, 3>(v, lut));
      _mm256_storeu_ps(o + 32, decode_pos<BITS, 4>(v, lut));
      _mm256_storeu_ps(o + 40, decode_pos<BITS, 5>(v, lut));
      _mm256_storeu_ps(o + 48, decode_pos<BITS, 6>(v, lut));
      _mm256_storeu_ps(o + 56, decode_pos<BITS, 7>(v, lut));
    }
  }
}

template <int BITS, int MB>
void rows_fast(const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t G, int64_t cpg,
               int64_t n_chunks, bool zero_level, const float* xp, int64_t xstride, int64_t N, const float* bias,
               float* y, int64_t m0, int threads) {
  const __m256i tlo = unit_table4(zero_level, false), thi = unit_table4(zero_level, true);
  pot::parallel_rows(N, n_chunks * kChunk * MB, threads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float out[MB];
      if (BITS == 4)
        row_dot_fast4<MB>(packed + n * row_bytes, row_bytes, scale + n * G, G, cpg, n_chunks, tlo, thi,
                          xp + m0 * xstride, xstride, out);
      else
        row_dot_fast<BITS, MB>(packed + n * row_bytes, row_bytes, scale + n * G, G, cpg, n_chunks, zero_level,
                               xp + m0 * xstride, xstride, out);
      const float b = bias ? bias[n] : 0.0f;
      for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = out[m] + b;
    }
  });
}

template <int BITS>
void linear_fast(const float* xp, int64_t M, int64_t xstride, const uint8_t* packed, int64_t row_bytes,
                 const uint16_t* scale, int64_t G, int64_t cpg, int64_t n_chunks, int64_t N, bool zero_level,
                 const float* bias, float* y, int threads) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t mb = std::min<int64_t>(8, M - m0);
    switch (mb) {
#define POT_CASE(B)                                                                                          \
  case B:                                                                                                   \
    rows_fast<BITS, B>(packed, row_bytes, scale, G, cpg, n_chunks, zero_level, xp, xstride, N, bias, y, m0, \
                       threads);                                                                            \
    break;
      POT_CASE(1) POT_CASE(2) POT_CASE(3) POT_CASE(4) POT_CASE(5) POT_CASE(6) POT_CASE(7) POT_CASE(8)
#undef POT_CASE
    }
    m0 += mb;
  }
}

#endif  // POT_AVX2

inline bool use_fast(int64_t group_size) { return POT_AVX2 && group_size % kChunk == 0; }

}  // namespace

extern "C" {

int pot_cpu_has_avx2() { return POT_AVX2; }

// 1 when pot_cpu_decode writes rows in chunk order (the caller permutes activations to match), else 0.
int pot_cpu_fast_layout(int64_t group_size) { return use_fast(group_size) ? 1 : 0; }

// y[M, N] = x[M, K] @ W.T (+ bias), fp32, W decoded on the fly from packed [N, row_bytes] and fp16 scale [N, G].
void pot_cpu_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t row_bytes,
                    const uint16_t* scale, int64_t G, int64_t group_size, int64_t N, int bits, int zero_level,
                    const float* bias, float* y, int threads) {
  const int64_t n_chunks = (K + kChunk - 1) / kChunk, kp = n_chunks * kChunk;
  const bool zl = zero_level != 0;
#if POT_AVX2
  if (use_fast(group_size)) {
    // The activation in the kernel's chunk order ([M, Kp], zero beyond K): pos[r] is where code 64c + r goes.
    int pos[kChunk];
    for (int q = 0; q < 8; ++q)
      for (int i = 0; i < 8; ++i) {
        if (bits == 4) pos[chunk_code4(q, i)] = q * 8 + i;
        else pos[8 * i + q] = q * 8 + i;  // lane i, position q holds code 8i + q
      }
    std::vector<float> xp(size_t(M * kp), 0.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xp[m * kp + (k / kChunk) * kChunk + pos[k % kChunk]] = x[m * K + k];
    const int64_t cpg = group_size / kChunk;
    const float* xd = xp.data();
    if (bits == 4) linear_fast<4>(xd, M, kp, packed, row_bytes, scale, G, cpg, n_chunks, N, zl, bias, y, threads);
    if (bits == 3) linear_fast<3>(xd, M, kp, packed, row_bytes, scale, G, cpg, n_chunks, N, zl, bias, y, threads);
    if (bits == 2) linear_fast<2>(xd, M, kp, packed, row_bytes, scale, G, cpg, n_chunks, N, zl, bias, y, threads);
    return;
  }
#endif
  pot::parallel_rows(N, K * M, threads, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(size_t(std::max<int64_t>(K, 1)));
    for (int64_t n = n0; n < n1; ++n) {
      decode_row_scalar(packed + n * row_bytes, scale + n * G, K, group_size, bits, zl, w.data());
      const float b = bias ? bias[n] : 0.0f;
      for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot(x + m * K, w.data(), K) + b;
    }
  });
}

// Decodes rows [n0, n1) to out[(n1-n0), Kp] fp32 (Kp = K rounded up to 64), in chunk order when
// pot_cpu_fast_layout(group_size), else in natural order; columns >= K hold finite padding.
void pot_cpu_decode(const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t G, int64_t group_size,
                    int64_t K, int64_t n0, int64_t n1, int bits, int zero_level, float* out, int threads) {
  const int64_t n_chunks = (K + kChunk - 1) / kChunk, kp = n_chunks * kChunk;
  const bool zl = zero_level != 0;
  pot::parallel_rows(n1 - n0, kp, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t n = n0 + r0; n < n0 + r1; ++n) {
      const uint8_t* row = packed + n * row_bytes;
      float* o = out + (n - n0) * kp;
#if POT_AVX2
      if (use_fast(group_size)) {
        const int64_t cpg = group_size / kChunk;
        if (bits == 4) decode_row_fast<4>(row, row_bytes, scale + n * G, G, cpg, n_chunks, zl, o);
        if (bits == 3) decode_row_fast<3>(row, row_bytes, scale + n * G, G, cpg, n_chunks, zl, o);
        if (bits == 2) decode_row_fast<2>(row, row_bytes, scale + n * G, G, cpg, n_chunks, zl, o);
        continue;
      }
#endif
      decode_row_scalar(row, scale + n * G, K, group_size, bits, zl, o);
      std::fill(o + K, o + kp, 0.0f);
    }
  });
}

}  // extern "C"
