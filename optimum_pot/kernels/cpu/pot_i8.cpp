// Integer path of the CPU kernel (backend "cpu_int8", see docs/cpu_kernel.md): int8 activations, PoT weights as
// powers of two, int32 accumulation.
//
// A weight is s * (-1)^p * 2^-e with e in [0, E) (E = 2^(bits-1) exponents). Written as
// s * 2^-(E-1) * (-1)^p * 2^(E-1-e), its integer part (-1)^p * 2^(E-1-e) is a power of two of at most 2^7, so
// q(x) * w_int is q(x) shifted left by E-1-e with the sign applied: exact in int16/int32. AVX2 has no per-byte
// variable shift, so the shift is done by _mm256_maddubs_epi16 against the byte 2^(E-1-e) (u8, looked up from the
// code with pshufb; the zero level looks up 0), the sign by _mm256_sign_epi8 on the activation byte, and
// _mm256_madd_epi16 widens pairs to int32 (a pair sums to at most 2 * 128 * 127 < 2^15: no saturation).
//
// Activations are quantised per row and per 64-column chunk to int8 (symmetric, round to nearest, scale
// max|x| / 127), laid out in the order the codes are unpacked (below). Per chunk, the int32 dot product is
// converted once and scaled by (weight scale * activation scale): the one multiply per group and chunk.
//
// Chunk layout (64 codes): 4-bit, 32 bytes: byte j holds codes 2j (low nibble) and 2j+1 (high nibble); the two
// unpacked vectors are [code 2j]_j and [code 2j+1]_j. 2-bit, 16 bytes: byte j holds codes 4j..4j+3; the 16 bytes are
// broadcast to both 128-bit halves and shifted by 0|2 and 4|6 bits per half: [4j | 4j+1]_j and [4j+2 | 4j+3]_j.
// 3-bit, 24 bytes: each 128-bit half holds 32 codes; a gather, a power-of-two multiply (the shift) and a shift
// unpack them to bytes: [codes 0-15 | 32-47] and [16-31 | 48-63]. Group sizes that are not multiples of 64 and CPUs
// without AVX2 use the fp32 path (pot_cpu.cpp).

#include <cmath>
#include <cstdint>
#include <vector>

#include "pot_pool.h"
#include "pot_simd.h"

extern "C" void pot_cpu_linear(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t row_bytes,
                               const uint16_t* scale, int64_t G, int64_t group_size, int64_t N, int bits,
                               int zero_level, const float* bias, float* y, int threads);

namespace {

using pot::kChunk;

// Position in a chunk's 64 int8 activations of code r of the chunk (the inverse of the layout above).
int i8_slot(int bits, int r) {
  if (bits == 4) return (r & 1) * 32 + (r >> 1);
  if (bits == 3) return (r & 16) * 2 + (r & 32) / 2 + (r & 15);  // code 32h+16u+j: vector u, half h, byte j
  return (r & 2) * 16 + (r & 1) * 16 + (r >> 2);  // 2-bit: code 4j+t sits in vector t/2, half t%2, byte j
}

// Quantises x[M, K] to xq[M, Kp] int8 in chunk layout and xs[M, n_chunks] fp32 scales (0 past K).
void quantize_rows(const float* x, int64_t M, int64_t K, int bits, int8_t* xq, float* xs) {
  const int64_t n_chunks = (K + kChunk - 1) / kChunk;
  int slot[kChunk];
  for (int r = 0; r < kChunk; ++r) slot[r] = i8_slot(bits, r);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const float* xc = x + m * K + c * kChunk;
      const int n = int(std::min<int64_t>(kChunk, K - c * kChunk));
      float amax = 0.0f;
      bool finite = true;
      for (int r = 0; r < n; ++r) {
        const float a = std::fabs(xc[r]);
        finite = finite && a <= 3.4e38f;  // false for inf and nan
        amax = std::max(amax, a);
      }
      if (!finite) amax = NAN;  // nan/inf in the chunk: the row's output becomes nan, as in fp32
      const float inv = (finite && amax > 0.0f) ? 127.0f / amax : 0.0f;
      int8_t* q = xq + m * n_chunks * kChunk + c * kChunk;
      for (int r = 0; r < kChunk; ++r) q[slot[r]] = r < n ? int8_t(std::lrint(xc[r] * inv)) : 0;
      xs[m * n_chunks + c] = amax / 127.0f;
    }
}

#if POT_AVX2

// pshufb tables by code: the byte 2^(E-1-e) (0 for the zero level) and the sign +-1.
void tables_i8(int bits, bool zero_level, __m256i* mag, __m256i* sgn) {
  alignas(32) int8_t m[32], s[32];
  const int n_e = 1 << (bits - 1);
  for (int i = 0; i < 32; ++i) {
    const int c = i & ((1 << bits) - 1), e = c & (n_e - 1);
    m[i] = (zero_level && e == n_e - 1) ? 0 : int8_t(uint8_t(1u << (n_e - 1 - e)));
    s[i] = (c >> (bits - 1)) ? -1 : 1;
  }
  *mag = _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
  *sgn = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
}

// pshufb controls of the 3-bit unpack: quarter k, 16-bit slot t gets the bytes around bit 3(8k+t) of its half.
struct Gather3 {
  alignas(32) int8_t v[4][32];
  constexpr Gather3() : v{} {
    for (int k = 0; k < 4; ++k)
      for (int t = 0; t < 8; ++t)
        for (int h = 0; h < 2; ++h) {
          v[k][16 * h + 2 * t] = int8_t((3 * (8 * k + t)) >> 3);
          v[k][16 * h + 2 * t + 1] = int8_t(((3 * (8 * k + t)) >> 3) + 1);
        }
  }
};
constexpr Gather3 kGather3{};

// The chunk's 64 codes as two vectors of 32 byte-codes (layout above).
template <int BITS>
inline void unpack_i8(const uint8_t* row, int64_t row_bytes, int64_t c, __m256i* a, __m256i* b) {
  alignas(32) uint8_t tmp[32];
  const uint8_t* src = pot::chunk_bytes<BITS>(row, row_bytes, c, tmp);
  if (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), low4 = _mm256_set1_epi8(0x0f);
    *a = _mm256_and_si256(v, low4);
    *b = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  } else if (BITS == 2) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    const __m256i low2 = _mm256_set1_epi8(0x03);
    *a = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), low2);
    *b = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), low2);
  } else {
    // 3-bit: each 128-bit half holds 12 bytes = 32 codes (bytes 0-11 low, 12-23 high). Quarter q puts code 8q+t
    // of a half in 16-bit slot t: the two bytes around bit 3(8q+t) are gathered (pshufb), then bits [s, s+3)
    // (s = 3t mod 8, the same for every q) are moved to the top by a left shift of 13 - s, done as a multiply by
    // 2^(13-s) (AVX2 has no per-lane 16-bit variable shift), and brought down by a shift of 13.
    const __m256i v = pot::load_halves3(src);
    const __m256i shift = _mm256_setr_epi16(8192, 1024, 128, 4096, 512, 64, 2048, 256,  //
                                            8192, 1024, 128, 4096, 512, 64, 2048, 256);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) {
      const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(kGather3.v[k]));
      q[k] = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, ctl), shift), 13);
    }
    *a = _mm256_packus_epi16(q[0], q[1]);  // per half: codes 0-15 of the half
    *b = _mm256_packus_epi16(q[2], q[3]);  // per half: codes 16-31 of the half
  }
}

// MB activation rows against one weight row.
template <int BITS, int MB>
void row_dot_i8(const uint8_t* row, int64_t row_bytes, const uint16_t* srow, int64_t cpg, int64_t n_chunks,
                __m256i mag, __m256i sgn, const int8_t* xq, const float* xs, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < n_chunks; ++c) {
    const float sw = _cvtsh_ss(srow[c / cpg]);
    __m256i a, b;
    unpack_i8<BITS>(row, row_bytes, c, &a, &b);
    const __m256i ma = _mm256_shuffle_epi8(mag, a), mb = _mm256_shuffle_epi8(mag, b);
    const __m256i sa = _mm256_shuffle_epi8(sgn, a), sb = _mm256_shuffle_epi8(sgn, b);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xc = xq + (m * n_chunks + c) * kChunk;
      const __m256i xa = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)), sa);
      const __m256i xb = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)), sb);
      const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ma, xa), ones),
                                           _mm256_madd_epi16(_mm256_maddubs_epi16(mb, xb), ones));
      total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sw * xs[m * n_chunks + c]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = pot::hsum(total[m]);
}

template <int BITS, int MB>
void rows_i8(const uint8_t* packed, int64_t row_bytes, const uint16_t* scale, int64_t G, int64_t cpg,
             int64_t n_chunks, bool zero_level, const int8_t* xq, const float* xs, int64_t N, const float* bias,
             float* y, int64_t m0, int threads) {
  __m256i mag, sgn;
  tables_i8(BITS, zero_level, &mag, &sgn);
  const float unit = std::ldexp(1.0f, 1 - (1 << (BITS - 1)));  // 2^-(E-1): the integer weights' exponent offset
  const int8_t* xm = xq + m0 * n_chunks * kChunk;
  const float* sm = xs + m0 * n_chunks;
  pot::parallel_rows(N, n_chunks * kChunk * MB / 2, threads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float out[MB];
      row_dot_i8<BITS, MB>(packed + n * row_bytes, row_bytes, scale + n * G, cpg, n_chunks, mag, sgn, xm, sm, out);
      const float b = bias ? bias[n] : 0.0f;
      for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = out[m] * unit + b;
    }
  });
}

template <int BITS>
void linear_i8(const int8_t* xq, const float* xs, int64_t M, const uint8_t* packed, int64_t row_bytes,
               const uint16_t* scale, int64_t G, int64_t cpg, int64_t n_chunks, int64_t N, bool zero_level,
               const float* bias, float* y, int threads) {
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t mb = std::min<int64_t>(4, M - m0);
    switch (mb) {
#define POT_CASE(B)                                                                                             \
  case B:                                                                                                      \
    rows_i8<BITS, B>(packed, row_bytes, scale, G, cpg, n_chunks, zero_level, xq, xs, N, bias, y, m0, threads); \
    break;
      POT_CASE(1) POT_CASE(2) POT_CASE(3) POT_CASE(4)
#undef POT_CASE
    }
    m0 += mb;
  }
}

#endif  // POT_AVX2

}  // namespace

extern "C" {

// 1 when pot_cpu_linear_i8 runs the integer path for these settings (else it runs the fp32 path).
int pot_cpu_i8_supported(int bits, int64_t group_size) {
  return POT_AVX2 && bits >= 2 && bits <= 4 && group_size % kChunk == 0;
}

// As pot_cpu_linear, with x quantised to int8 per row and 64-column chunk (integer path, see above).
void pot_cpu_linear_i8(const float* x, int64_t M, int64_t K, const uint8_t* packed, int64_t row_bytes,
                       const uint16_t* scale, int64_t G, int64_t group_size, int64_t N, int bits, int zero_level,
                       const float* bias, float* y, int threads) {
#if POT_AVX2
  if (pot_cpu_i8_supported(bits, group_size)) {
    const int64_t n_chunks = (K + kChunk - 1) / kChunk;
    std::vector<int8_t> xq(size_t(M * n_chunks * kChunk));
    std::vector<float> xs(size_t(M * n_chunks));
    quantize_rows(x, M, K, bits, xq.data(), xs.data());
    const int64_t cpg = group_size / kChunk;
    if (bits == 3)
      linear_i8<3>(xq.data(), xs.data(), M, packed, row_bytes, scale, G, cpg, n_chunks, N, zero_level != 0, bias,
                   y, threads);
    else if (bits == 4)
      linear_i8<4>(xq.data(), xs.data(), M, packed, row_bytes, scale, G, cpg, n_chunks, N, zero_level != 0, bias,
                   y, threads);
    else
      linear_i8<2>(xq.data(), xs.data(), M, packed, row_bytes, scale, G, cpg, n_chunks, N, zero_level != 0, bias,
                   y, threads);
    return;
  }
#endif
  pot_cpu_linear(x, M, K, packed, row_bytes, scale, G, group_size, N, bits, zero_level, bias, y, threads);
}

}  // extern "C"
