// Integer path of the CPU kernel (backend "cpu_int8", see docs/cpu_kernel.md): int8 activations, levels as small
// integers, int32 accumulation.
//
// A level set with int8_shift F (LevelSet.int8_shift) has every |L[c]| * 2^F an integer <= 128, so a weight is
// s * 2^-F * (+-1) * m_c with m_c = |L[c]| * 2^F an unsigned byte, and q(x) * w_int is exact in int16/int32. Two
// pshufb lookups by code give m_c (u8) and the sign (+-1, applied to the activation byte by _mm256_sign_epi8);
// _mm256_maddubs_epi16 multiplies them (the shift of a power of two, the shift-and-add of a two-term level) and
// _mm256_madd_epi16 widens pairs to int32 (a pair sums to at most 2 * 128 * 127 < 2^15: no saturation). The tables
// come from the level set's values (data): a newly registered family needs no change here.
//
// Activations are quantised per row and per 64-column chunk to int8 (symmetric, round to nearest even, scale
// max|x| / 127; format/activations.py is the reference), laid out in the order the codes are unpacked (below). Per
// chunk, the int32 dot product is converted once and scaled by (weight scale * activation scale): the one multiply
// per group and chunk. An offset z_g adds z_g * sum_{chunks c of g} xs_c * sum(q_c): the int8 chunk sums times the
// activation scale, computed once per call, so the result equals the reference on the rounded activations.
//
// Chunk layout (64 codes): 4-bit, 32 bytes: byte j holds codes 2j (low nibble) and 2j+1 (high nibble); the two
// unpacked vectors are [code 2j]_j and [code 2j+1]_j. 2-bit, 16 bytes: byte j holds codes 4j..4j+3; the 16 bytes are
// broadcast to both 128-bit halves and shifted by 0|2 and 4|6 bits per half: [4j | 4j+1]_j and [4j+2 | 4j+3]_j.
// 3-bit, 24 bytes: each 128-bit half holds 32 codes; a gather, a power-of-two multiply (the shift) and a shift
// unpack them to bytes: [codes 0-15 | 32-47] and [16-31 | 48-63]. Group sizes that are not multiples of 64, level
// sets without an int8_shift and CPUs without AVX2 use the fp32 path (pot_cpu.cpp).
//
// This file is compiled twice (build.py): once with the AVX2 flags, and once more with POT_I8_VNNI_UNIT defined and,
// where the compiler takes them, AVX512-VNNI + VL flags. In that unit each chunk's two maddubs + two madd + add
// become two vpdpbusd (u8 x s8 summed by fours straight into int32: the same exact integers), measured 5-37 %
// faster on one thread; pot_cpu_linear_i8 (first unit) calls it when the CPU has the instructions.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pot_api.h"
#include "pot_pool.h"
#include "pot_simd.h"

#if defined(POT_I8_VNNI_UNIT) && POT_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define POT_I8_VNNI 1
#else
#define POT_I8_VNNI 0
#endif

namespace {

using pot::kChunk;

#if POT_AVX2

// Position in a chunk's 64 int8 activations of code r of the chunk (the inverse of the layout above).
int i8_slot(int bits, int r) {
  if (bits == 4) return (r & 1) * 32 + (r >> 1);
  if (bits == 3) return (r & 16) * 2 + (r & 32) / 2 + (r & 15);  // code 32h+16u+j: vector u, half h, byte j
  return (r & 2) * 16 + (r & 1) * 16 + (r >> 2);  // 2-bit: code 4j+t sits in vector t/2, half t%2, byte j
}

// Quantises x[M, K] to xq[M, Kp] int8 in chunk layout and xs[M, n_chunks] fp32 scales (0 past K). With xg
// ([M, G], zeroed by the caller), also the offset's activation sums: xg[m, g] += xs * sum(q) over g's chunks.
void quantize_rows(const PotArgs& a, int8_t* xq, float* xs, float* xg) {
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk, cpg = a.group_size / kChunk;
  int slot[kChunk];
  for (int r = 0; r < kChunk; ++r) slot[r] = i8_slot(a.bits, r);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const float* xc = a.x + m * a.K + c * kChunk;
      const int n = int(std::min<int64_t>(kChunk, a.K - c * kChunk));
      float amax = 0.0f;
      bool finite = true;
      for (int r = 0; r < n; ++r) {
        finite = finite && std::isfinite(xc[r]);
        amax = std::max(amax, std::fabs(xc[r]));
      }
      if (!finite) amax = NAN;  // nan/inf in the chunk: the row's output becomes nan, as in fp32
      const float inv = (finite && amax > 0.0f) ? 127.0f / amax : 0.0f;
      int8_t* q = xq + m * n_chunks * kChunk + c * kChunk;
      int32_t qsum = 0;
      for (int r = 0; r < kChunk; ++r) {
        const int8_t v = r < n ? int8_t(std::lrint(xc[r] * inv)) : 0;
        q[slot[r]] = v;
        qsum += v;
      }
      xs[m * n_chunks + c] = amax / 127.0f;
      if (xg != nullptr) xg[m * a.G + c / cpg] += xs[m * n_chunks + c] * float(qsum);
    }
}

// pshufb tables by code (repeated over the 32 bytes): the magnitude |L[c]| * 2^F (u8, <= 128) and the sign +-1.
void tables_i8(const PotArgs& a, __m256i* mag, __m256i* sgn) {
  alignas(32) int8_t m[32], s[32];
  for (int i = 0; i < 32; ++i) {
    const float v = a.values[i & ((1 << a.bits) - 1)];
    m[i] = int8_t(uint8_t(std::lrint(std::fabs(std::ldexp(v, a.int8_shift)))));
    s[i] = v < 0.0f ? -1 : 1;
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
void row_dot_i8(const PotArgs& a, int64_t n, __m256i mag, __m256i sgn, const int8_t* xq, const float* xs,
                float* out) {
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk, cpg = a.group_size / kChunk;
  const uint8_t* row = a.packed + n * a.row_bytes;
  const uint16_t* srow = a.scale + n * a.G;
#if !POT_I8_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  __m256 total[MB];
  for (int m = 0; m < MB; ++m) total[m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < n_chunks; ++c) {
    const float sw = _cvtsh_ss(srow[cpg == 1 ? c : c / cpg]);  // no division in the common group of 64
    __m256i va, vb;
    unpack_i8<BITS>(row, a.row_bytes, c, &va, &vb);
    const __m256i ma = _mm256_shuffle_epi8(mag, va), mb = _mm256_shuffle_epi8(mag, vb);
    const __m256i sa = _mm256_shuffle_epi8(sgn, va), sb = _mm256_shuffle_epi8(sgn, vb);
    for (int m = 0; m < MB; ++m) {
      const int8_t* xc = xq + (m * n_chunks + c) * kChunk;
      const __m256i xa = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)), sa);
      const __m256i xb = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)), sb);
#if POT_I8_VNNI
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ma, xa), mb, xb);
#else
      const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ma, xa), ones),
                                           _mm256_madd_epi16(_mm256_maddubs_epi16(mb, xb), ones));
#endif
      total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sw * xs[m * n_chunks + c]), total[m]);
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = pot::hsum(total[m]);
}

// Rows m0..m0+MB-1 of y. xg: [M, G] activation sums of the offset (null without an offset).
template <int BITS, int MB>
void rows_i8(const PotArgs& a, const int8_t* xq, const float* xs, const float* xg, int64_t m0) {
  __m256i mag, sgn;
  tables_i8(a, &mag, &sgn);
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk;
  const float unit = std::ldexp(1.0f, -a.int8_shift);  // 2^-F: the integer levels' scale
  const int8_t* xm = xq + m0 * n_chunks * kChunk;
  const float* sm = xs + m0 * n_chunks;
  pot::parallel_rows(a.N, n_chunks * kChunk * MB / 2, a.threads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float out[MB];
      row_dot_i8<BITS, MB>(a, n, mag, sgn, xm, sm, out);
      const float b = a.bias ? a.bias[n] : 0.0f;
      for (int m = 0; m < MB; ++m) {
        const float off = xg != nullptr ? pot::offset_dot(a.offset + n * a.G, xg + (m0 + m) * a.G, a.G) : 0.0f;
        a.y[(m0 + m) * a.N + n] = out[m] * unit + off + b;
      }
    }
  });
}

template <int BITS>
void linear_i8(const PotArgs& a, const int8_t* xq, const float* xs, const float* xg) {
  for (int64_t m0 = 0; m0 < a.M;) {
    const int64_t mb = std::min<int64_t>(4, a.M - m0);
    switch (mb) {
#define POT_CASE(B)                           \
  case B:                                     \
    rows_i8<BITS, B>(a, xq, xs, xg, m0);      \
    break;
      POT_CASE(1) POT_CASE(2) POT_CASE(3) POT_CASE(4)
#undef POT_CASE
    }
    m0 += mb;
  }
}

// The integer path on arguments pot_cpu_i8_supported accepts.
int run_i8(const PotArgs& pa) {
  PotArgs a = pa;
  a.threads = std::max(a.threads, 1);
  if (a.M == 0 || a.N == 0) return POT_OK;
  const int64_t n_chunks = (a.K + kChunk - 1) / kChunk;
  std::vector<int8_t> xq(size_t(a.M * n_chunks * kChunk));
  std::vector<float> xs(size_t(a.M * n_chunks));
  std::vector<float> xg(a.offset != nullptr ? size_t(a.M * a.G) : 0, 0.0f);
  quantize_rows(a, xq.data(), xs.data(), xg.empty() ? nullptr : xg.data());
  const float* g = xg.empty() ? nullptr : xg.data();
  if (a.bits == 2) linear_i8<2>(a, xq.data(), xs.data(), g);
  if (a.bits == 3) linear_i8<3>(a, xq.data(), xs.data(), g);
  if (a.bits == 4) linear_i8<4>(a, xq.data(), xs.data(), g);
  return POT_OK;
}

#endif  // POT_AVX2

}  // namespace

#ifdef POT_I8_VNNI_UNIT

// Both are internal to the library (hidden): the first unit checks the arguments before calling the second.
extern "C" {
// Whether this (second) unit was compiled with AVX512-VNNI; the first unit also asks the CPU before calling it.
__attribute__((visibility("hidden"))) int pot_cpu_i8_vnni_built() { return POT_I8_VNNI; }

__attribute__((visibility("hidden"))) int pot_cpu_linear_i8_vnni(const PotArgs* a) {
#if POT_I8_VNNI
  return run_i8(*a);
#else
  (void)a;
  return POT_BAD_SHIFT;  // never called: pot_cpu_i8_vnni_built() is 0
#endif
}
}  // extern "C"

#else  // the first unit: the entry points

extern "C" {
__attribute__((visibility("hidden"))) int pot_cpu_i8_vnni_built();
__attribute__((visibility("hidden"))) int pot_cpu_linear_i8_vnni(const PotArgs* a);
}

namespace {
std::atomic<int> g_vnni_allowed{1};  // tests turn the VNNI unit off to compare both on one machine

bool vnni_runs() {
  static const bool available = pot_cpu_i8_vnni_built() && __builtin_cpu_supports("avx512vnni") &&
                                __builtin_cpu_supports("avx512vl");
  return available && g_vnni_allowed.load(std::memory_order_relaxed) != 0;
}
}  // namespace

extern "C" {

// enable 0: the AVX2 dot product only; 1: AVX512-VNNI where built and supported (the default); other values only
// ask. Returns whether the integer path now uses VNNI.
int pot_cpu_i8_vnni(int enable) {
  if (enable == 0 || enable == 1) g_vnni_allowed.store(enable);
  return vnni_runs();
}

// 1 when pot_cpu_linear_i8 runs the integer path for these arguments (else it runs the fp32 path).
int pot_cpu_i8_supported(const PotArgs* a) {
  return POT_AVX2 && pot_cpu_check(a) == POT_OK && a->int8_shift >= 0 && a->group_size % kChunk == 0;
}

int pot_cpu_linear_i8(const PotArgs* pa) {
  if (const int status = pot_cpu_check_linear(pa)) return status;
#if POT_AVX2
  if (pot_cpu_i8_supported(pa)) return vnni_runs() ? pot_cpu_linear_i8_vnni(pa) : run_i8(*pa);
#endif
  return pot_cpu_linear(pa);
}

}  // extern "C"

#endif  // POT_I8_VNNI_UNIT
