// CPU kernels for the packed linear with fp32 activations (see docs/cpu_kernel.md).
//
// Weights are read straight from the canonical layout (optimum_pot/format/packing.py): each row is a little-endian
// bit stream of `bits`-bit codes, w = s_g * L[code] (+ z_g), with L the level set's unit values (passed as data).
// No repacking and no per-weight multiply:
//
//  * 2 and 3 bits: per group, the table of the 2^bits decoded values s * L[c] (+ z) (the reference's decode,
//    operation for operation) sits in one register. A 64-code chunk of a row is loaded so that 32-bit lane l holds
//    codes 8l..8l+7 (3-bit: 3 bytes per lane via a byte shuffle; 2-bit: 2 bytes per lane); shifting the lanes right
//    by p*bits puts code 8l+p in the low bits, and _mm256_permutevar8x32_ps (which reads only the low 3 bits of each
//    index) looks its value up: 2 ops per 8 weights, then one FMA against a contiguous 8-float load of x (the
//    activation is permuted once per call into the same "chunk order"). The offset is inside the table: free.
//  * 4 bits, every L[c] exact in bf16 (every two-term value with terms <= 8 binades apart is): two pshufb lookups
//    give the two bytes of the bf16 word of L[c], a byte and a zero interleave widen it to fp32, one FMA
//    accumulates x * L[c]; the group's sum is multiplied by s once (one multiply per group), and the offset adds
//    z_g * sum_{k in g} x_k once per group (the group sums of x are computed once per call).
//  * 4 bits otherwise (and the prefill decode): two 8-entry tables s * L[c] (+ z), two permutes and a blend on
//    the code's bit 3 per 8 weights.
//
// Without AVX2/FMA/F16C (or for group sizes that are not multiples of 64) a portable path decodes each row with
// the same per-group table (scalar) and takes dot products. Threads (pot_pool.h) split output rows.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pot_api.h"
#include "pot_pool.h"
#include "pot_simd.h"

namespace {

using pot::f2u;
using pot::half_to_float;
using pot::kChunk;

// Decoded value of every code of group g of row n: s * L[c] (+ z), as format/levels.py:decode computes it.
inline void group_table(const PotArgs& a, int64_t n, int64_t g, float* table) {
  const float s = half_to_float(a.scale[n * a.G + g]);
  const int n_codes = 1 << a.bits;
  if (a.offset != nullptr) {
    const float z = half_to_float(a.offset[n * a.G + g]);
    for (int c = 0; c < n_codes; ++c) table[c] = s * a.values[c] + z;
  } else {
    for (int c = 0; c < n_codes; ++c) table[c] = s * a.values[c];
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

// Portable decode of row n to natural order (out[k] for k < K).
void decode_row_scalar(const PotArgs& a, int64_t n, float* out) {
  float table[16];
  const uint8_t* row = a.packed + n * a.row_bytes;
  for (int64_t k0 = 0, g = 0; k0 < a.K; k0 += a.group_size, ++g) {
    group_table(a, n, g, table);
    const int64_t k1 = std::min(a.K, k0 + a.group_size);
    for (int64_t k = k0; k < k1; ++k) out[k] = table[code_at(row, k, a.bits)];
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
  float s = pot::hsum(_mm256_add_ps(acc0, acc1));
#else
  float s = 0.0f;
#endif
  float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) p[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) p[0] += a[i] * b[i];
  return s + ((p[0] + p[1]) + (p[2] + p[3]));
}

void linear_portable(const PotArgs& a) {
  pot::parallel_rows(a.N, a.K * a.M, a.threads, [&](int64_t n0, int64_t n1) {
    std::vector<float> w(size_t(a.K));
    for (int64_t n = n0; n < n1; ++n) {
      decode_row_scalar(a, n, w.data());
      const float b = a.bias ? a.bias[n] : 0.0f;
      for (int64_t m = 0; m < a.M; ++m) a.y[m * a.N + n] = dot(a.x + m * a.K, w.data(), a.K) + b;
    }
  });
}

inline bool use_fast(int64_t group_size) { return POT_AVX2 && group_size % kChunk == 0; }

// Position in a chunk of the activation that meets code r of the chunk: lane order (lane i, position q holds code
// 8i + q) for the permute paths, the pshufb unpack order for the 4-bit bf16 path.
inline int chunk_code4(int q, int i) {
  return 2 * (16 * (i >> 2) + 8 * ((q >> 1) & 1) + 4 * (q & 1) + (i & 3)) + (q >> 2);
}

void chunk_positions(bool pshufb4, int* pos) {
  for (int q = 0; q < 8; ++q)
    for (int i = 0; i < 8; ++i) pos[pshufb4 ? chunk_code4(q, i) : 8 * i + q] = q * 8 + i;
}

// x [M, K] -> out [M, Kp] in chunk order (zero beyond K).
void permute_x(const float* x, int64_t M, int64_t K, bool pshufb4, float* out) {
  const int64_t kp = (K + kChunk - 1) / kChunk * kChunk;
  int pos[kChunk];
  chunk_positions(pshufb4, pos);
  std::fill(out, out + M * kp, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) out[m * kp + (k / kChunk) * kChunk + pos[k % kChunk]] = x[m * K + k];
}

#if POT_AVX2

// Whether every unit value is exactly a bf16 number (its fp32 pattern has 16 zero low bits): the 4-bit pshufb path.
bool bf16_exact(const PotArgs& a) {
  for (int c = 0; c < (1 << a.bits); ++c)
    if (f2u(a.values[c]) & 0xffffu) return false;
  return true;
}

// The 8-entry permute tables of a group: 2-bit repeated (the index's bit 2 belongs to the next code), 3-bit by code,
// 4-bit codes 0-7 in `lo` and 8-15 in `hi`.
struct Lut {
  __m256 lo, hi;
};

template <int BITS>
inline Lut group_lut(const PotArgs& a, int64_t n, int64_t g) {
  float t[16];
  group_table(a, n, g, t);
  if (BITS == 2)
    for (int c = 4; c < 8; ++c) t[c] = t[c - 4];
  return {_mm256_loadu_ps(t), BITS == 4 ? _mm256_loadu_ps(t + 8) : _mm256_setzero_ps()};
}

// Decoded weights of position p of a chunk (lane l = code 8l+p).
template <int BITS, int P>
inline __m256 decode_pos(__m256i v, const Lut& lut) {
  const __m256i idx = _mm256_srli_epi32(v, P * BITS);
  const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, idx);
  if (BITS != 4) return lo;
  const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(v, 28 - 4 * P)));  // code bit 3 -> bit 31
}

// MB activation rows against one weight row (permute paths); A accumulators per activation row hide FMA latency.
template <int BITS, int MB>
void row_dot_lut(const PotArgs& a, int64_t n, const float* xp, int64_t xstride, float* out) {
  constexpr int A = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk, cpg = a.group_size / kChunk;
  const uint8_t* row = a.packed + n * a.row_bytes;
  __m256 acc[MB][A];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < A; ++i) acc[m][i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    const Lut lut = group_lut<BITS>(a, n, g);
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = pot::load_chunk<BITS>(row, a.row_bytes, c);
      const float* xc = xp + c * kChunk;
#define POT_STEP(P)                                                                                 \
  {                                                                                                 \
    const __m256 w = decode_pos<BITS, P>(v, lut);                                                   \
    for (int m = 0; m < MB; ++m)                                                                    \
      acc[m][P % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + m * xstride + P * 8), acc[m][P % A]); \
  }
      POT_STEP(0) POT_STEP(1) POT_STEP(2) POT_STEP(3) POT_STEP(4) POT_STEP(5) POT_STEP(6) POT_STEP(7)
#undef POT_STEP
    }
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[m][0];
    for (int i = 1; i < A; ++i) s = _mm256_add_ps(s, acc[m][i]);
    out[m] = pot::hsum(s);
  }
}

// pshufb tables of the low / high byte of each code's bf16 word (16 codes, repeated in both 128-bit halves).
struct Bf16Table {
  __m256i lo, hi;
};

Bf16Table bf16_table(const float* values) {
  alignas(32) uint8_t lo[32], hi[32];
  for (int c = 0; c < 16; ++c) {
    const uint32_t word = f2u(values[c]) >> 16;
    lo[c] = lo[c + 16] = uint8_t(word & 0xff);
    hi[c] = hi[c + 16] = uint8_t(word >> 8);
  }
  return {_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
          _mm256_load_si256(reinterpret_cast<const __m256i*>(hi))};
}

// 4-bit, bf16-exact table: sum of x * L[c] per group, times s once per group (the offset is added by the caller).
template <int MB>
void row_dot_bf16(const PotArgs& a, int64_t n, const Bf16Table& t, const float* xp, int64_t xstride, float* out) {
  constexpr int A = MB >= 4 ? 1 : (MB >= 2 ? 2 : 4);
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk, cpg = a.group_size / kChunk;
  const uint8_t* row = a.packed + n * a.row_bytes;
  const uint16_t* srow = a.scale + n * a.G;
  const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < a.G; ++g) {
    __m256 acc[MB][A];
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < A; ++i) acc[m][i] = _mm256_setzero_ps();
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = pot::load_chunk<4>(row, a.row_bytes, c);
      const __m256i even = _mm256_and_si256(v, low4), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      const __m256i el = _mm256_shuffle_epi8(t.lo, even), eh = _mm256_shuffle_epi8(t.hi, even);
      const __m256i ol = _mm256_shuffle_epi8(t.lo, odd), oh = _mm256_shuffle_epi8(t.hi, odd);
      const __m256i words[4] = {_mm256_unpacklo_epi8(el, eh), _mm256_unpackhi_epi8(el, eh),
                                _mm256_unpacklo_epi8(ol, oh), _mm256_unpackhi_epi8(ol, oh)};  // bf16
      const float* xc = xp + c * kChunk;
#define POT_STEP4(Q)                                                                                       \
  {                                                                                                        \
    const __m256i wq =                                                                                     \
        (Q & 1) ? _mm256_unpackhi_epi16(zero, words[Q / 2]) : _mm256_unpacklo_epi16(zero, words[Q / 2]);   \
    const __m256 w = _mm256_castsi256_ps(wq);                                                              \
    for (int m = 0; m < MB; ++m)                                                                           \
      acc[m][Q % A] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + m * xstride + Q * 8), acc[m][Q % A]);        \
  }
      POT_STEP4(0) POT_STEP4(1) POT_STEP4(2) POT_STEP4(3) POT_STEP4(4) POT_STEP4(5) POT_STEP4(6) POT_STEP4(7)
#undef POT_STEP4
    }
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(srow[g]));
    for (int m = 0; m < MB; ++m) {
      __m256 sum = acc[m][0];
      for (int i = 1; i < A; ++i) sum = _mm256_add_ps(sum, acc[m][i]);
      total[m] = _mm256_fmadd_ps(s, sum, total[m]);  // the one multiply per group
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = pot::hsum(total[m]);
}

enum class Path { kLut2, kLut3, kLut4, kBf16 };

// Rows m0..m0+MB-1 of y. xg: [M, G] group sums of x (only for the bf16 path with an offset).
template <Path P, int MB>
void rows_fast(const PotArgs& a, const float* xp, int64_t xstride, const float* xg, int64_t m0) {
  const Bf16Table t = P == Path::kBf16 ? bf16_table(a.values) : Bf16Table{};
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk;
  pot::parallel_rows(a.N, n_chunks * kChunk * MB, a.threads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float out[MB];
      const float* x0 = xp + m0 * xstride;
      if (P == Path::kBf16) row_dot_bf16<MB>(a, n, t, x0, xstride, out);
      if (P == Path::kLut2) row_dot_lut<2, MB>(a, n, x0, xstride, out);
      if (P == Path::kLut3) row_dot_lut<3, MB>(a, n, x0, xstride, out);
      if (P == Path::kLut4) row_dot_lut<4, MB>(a, n, x0, xstride, out);
      const float b = a.bias ? a.bias[n] : 0.0f;
      for (int m = 0; m < MB; ++m) {
        const float off = xg != nullptr ? pot::offset_dot(a.offset + n * a.G, xg + (m0 + m) * a.G, a.G) : 0.0f;
        a.y[(m0 + m) * a.N + n] = out[m] + off + b;
      }
    }
  });
}

template <Path P>
void linear_fast(const PotArgs& a, const float* xp, int64_t xstride, const float* xg) {
  for (int64_t m0 = 0; m0 < a.M;) {
    const int64_t mb = std::min<int64_t>(8, a.M - m0);
    switch (mb) {
#define POT_CASE(B)                          \
  case B:                                    \
    rows_fast<P, B>(a, xp, xstride, xg, m0); \
    break;
      POT_CASE(1) POT_CASE(2) POT_CASE(3) POT_CASE(4) POT_CASE(5) POT_CASE(6) POT_CASE(7) POT_CASE(8)
#undef POT_CASE
    }
    m0 += mb;
  }
}

void linear_avx2(const PotArgs& a) {
  const bool pshufb4 = a.bits == 4 && bf16_exact(a);
  const int64_t kp = (a.K + kChunk - 1) / kChunk * kChunk;
  std::vector<float> xp(size_t(a.M * kp));
  permute_x(a.x, a.M, a.K, pshufb4, xp.data());
  if (!pshufb4) {  // the offset is inside the per-group tables
    if (a.bits == 2) linear_fast<Path::kLut2>(a, xp.data(), kp, nullptr);
    if (a.bits == 3) linear_fast<Path::kLut3>(a, xp.data(), kp, nullptr);
    if (a.bits == 4) linear_fast<Path::kLut4>(a, xp.data(), kp, nullptr);
    return;
  }
  std::vector<float> xg;
  if (a.offset != nullptr) {  // sum of x over each group's columns, once per call
    xg.assign(size_t(a.M * a.G), 0.0f);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t k = 0; k < a.K; ++k) xg[m * a.G + k / a.group_size] += a.x[m * a.K + k];
  }
  linear_fast<Path::kBf16>(a, xp.data(), kp, xg.empty() ? nullptr : xg.data());
}

template <int BITS>
void decode_row_fast(const PotArgs& a, int64_t n, float* out) {
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk, cpg = a.group_size / kChunk;
  const uint8_t* row = a.packed + n * a.row_bytes;
  for (int64_t g = 0; g < a.G; ++g) {
    const Lut lut = group_lut<BITS>(a, n, g);
    const int64_t c1 = std::min(n_chunks, (g + 1) * cpg);
    for (int64_t c = g * cpg; c < c1; ++c) {
      const __m256i v = pot::load_chunk<BITS>(row, a.row_bytes, c);
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

#endif  // POT_AVX2

constexpr int64_t kMaxDim = int64_t(1) << 40;  // bounds every product of sizes, far from int64 overflow
// Rows of x up to which the one-pass kernels run; above, the operator decodes tiles and calls the GEMM. Measured
// (4096x4096, 1 thread): direct 13 ms vs tiled 19 ms at M=12, 20 vs 14 at M=16.
constexpr int kGemmMinM = 12;

}  // namespace

extern "C" {

int pot_cpu_check(const PotArgs* a) {
  if (a == nullptr) return POT_NULL;
  if (a->bits < 2 || a->bits > 4) return POT_BAD_BITS;
  if (a->M < 0 || a->N < 0 || a->K < 1 || a->group_size < 1 || a->K > kMaxDim || a->group_size > kMaxDim ||
      a->M > kMaxDim / a->K || a->N > kMaxDim / a->K || (a->N > 0 && a->M > kMaxDim / a->N))
    return POT_BAD_SIZES;
  if (a->row_bytes != (a->K + 7) / 8 * a->bits) return POT_BAD_ROW_BYTES;
  if (a->G != (a->K + a->group_size - 1) / a->group_size) return POT_BAD_GROUPS;
  if (a->values == nullptr || (a->N > 0 && (a->packed == nullptr || a->scale == nullptr))) return POT_NULL;
  for (int c = 0; c < (1 << a->bits); ++c)
    if (!std::isfinite(a->values[c])) return POT_BAD_LEVELS;
  if (a->int8_shift < -1 || a->int8_shift > 15) return POT_BAD_SHIFT;
  if (a->int8_shift >= 0)
    for (int c = 0; c < (1 << a->bits); ++c) {
      const float q = std::fabs(std::ldexp(a->values[c], a->int8_shift));
      if (q > 128.0f || q != std::floor(q)) return POT_BAD_SHIFT;
    }
  return POT_OK;
}

const char* pot_cpu_status_message(int status) {
  switch (status) {
    case POT_OK: return "ok";
    case POT_BAD_BITS: return "bits must be 2, 3 or 4";
    case POT_BAD_SIZES: return "M, K, N or the group size is negative, zero or too large";
    case POT_BAD_ROW_BYTES: return "packed row bytes do not match in_features and bits (ceil(K/8)*bits)";
    case POT_BAD_GROUPS: return "scale/offset columns do not match in_features and group_size (ceil(K/group))";
    case POT_NULL: return "a required buffer is missing";
    case POT_BAD_LEVELS: return "a unit value of the level set is not finite";
    case POT_BAD_SHIFT: return "int8_shift does not make every |level| * 2^shift an integer <= 128";
    case POT_BAD_RANGE: return "decoded rows outside [0, N)";
    default: return "unknown status";
  }
}

int64_t pot_cpu_args_size() { return int64_t(sizeof(PotArgs)); }
int64_t pot_cpu_pool_helper_tasks() { return pot::Pool::get().helper_tasks(); }
void pot_cpu_set_parallel(PotParallelFn fn) { pot::parallel_hook().store(fn, std::memory_order_release); }
int pot_cpu_has_avx2() { return POT_AVX2; }
int pot_cpu_gemm_min_m() { return kGemmMinM; }

int pot_cpu_check_linear(const PotArgs* a) {
  if (const int status = pot_cpu_check(a)) return status;
  return a->M > 0 && a->N > 0 && (a->x == nullptr || a->y == nullptr) ? POT_NULL : POT_OK;
}

int pot_cpu_linear(const PotArgs* pa) {
  if (const int status = pot_cpu_check_linear(pa)) return status;
  PotArgs a = *pa;
  a.threads = std::max(a.threads, 1);
  if (a.M == 0 || a.N == 0) return POT_OK;
#if POT_AVX2
  if (use_fast(a.group_size)) {
    linear_avx2(a);
    return POT_OK;
  }
#endif
  linear_portable(a);
  return POT_OK;
}

// The checks of both decode entry points: valid arguments, rows [n0, n1) inside [0, N), an output when rows exist.
static int decode_status(const PotArgs* a, int64_t n0, int64_t n1, const void* out) {
  if (const int status = pot_cpu_check(a)) return status;
  if (n0 < 0 || n1 < n0 || n1 > a->N) return POT_BAD_RANGE;
  return out == nullptr && n1 > n0 ? POT_NULL : POT_OK;
}

int pot_cpu_decode_bf16(const PotArgs* pa, int64_t n0, int64_t n1, uint16_t* out) {
  if (const int status = decode_status(pa, n0, n1, out)) return status;
  const PotArgs& a = *pa;
  const int64_t kp = (a.K + kChunk - 1) / kChunk * kChunk;
  PotArgs one = a;
  one.threads = 1;  // each worker decodes its rows alone, through a row buffer that stays in L1/L2
  pot::parallel_rows(n1 - n0, kp, std::max(a.threads, 1), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(kp));
    for (int64_t n = n0 + r0; n < n0 + r1; ++n) {
      pot_cpu_decode(&one, n, n + 1, row.data());
      uint16_t* o = out + (n - n0) * kp;
      for (int64_t k = 0; k < kp; ++k) {  // decoded values are finite: plain round to nearest even
        const uint32_t u = f2u(row[size_t(k)]);
        o[k] = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      }
    }
  });
  return POT_OK;
}

int pot_cpu_layout_x(const PotArgs* a, float* out) {
  if (const int status = pot_cpu_check(a)) return status;
  if (out == nullptr || (a->M > 0 && a->x == nullptr)) return POT_NULL;
  const int64_t kp = (a->K + kChunk - 1) / kChunk * kChunk;
  if (use_fast(a->group_size)) {
    permute_x(a->x, a->M, a->K, false, out);
    return POT_OK;
  }
  for (int64_t m = 0; m < a->M; ++m) {
    std::memcpy(out + m * kp, a->x + m * a->K, size_t(a->K) * sizeof(float));
    std::fill(out + m * kp + a->K, out + (m + 1) * kp, 0.0f);
  }
  return POT_OK;
}

int pot_cpu_decode(const PotArgs* pa, int64_t n0, int64_t n1, float* out) {
  if (const int status = decode_status(pa, n0, n1, out)) return status;
  const PotArgs& a = *pa;
  const int64_t kp = (a.K + kChunk - 1) / kChunk * kChunk;
  pot::parallel_rows(n1 - n0, kp, std::max(a.threads, 1), [&](int64_t r0, int64_t r1) {
    for (int64_t n = n0 + r0; n < n0 + r1; ++n) {
      float* o = out + (n - n0) * kp;
#if POT_AVX2
      if (use_fast(a.group_size)) {
        if (a.bits == 4) decode_row_fast<4>(a, n, o);
        if (a.bits == 3) decode_row_fast<3>(a, n, o);
        if (a.bits == 2) decode_row_fast<2>(a, n, o);
        continue;
      }
#endif
      decode_row_scalar(a, n, o);
      std::fill(o + a.K, o + kp, 0.0f);
    }
  });
  return POT_OK;
}

}  // extern "C"
