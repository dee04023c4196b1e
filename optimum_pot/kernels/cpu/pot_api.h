// The C ABI of the CPU kernels (pot_cpu.cpp: fp32 activations, pot_i8.cpp: int8 activations), shared by the torch
// operator (pot_op.cpp) and the ctypes loader used for the kernel-only build (build.py, ctypes_kernel.py).
//
// A weight is w = s_g * L[code] (+ z_g): `values` holds the level set's 2^bits unit values L (the level set
// reaches the kernel as data, so a newly registered family needs no C++ change), `scale` / `offset` one fp16 per
// group. Every entry point re-checks the sizes (pot_cpu_check) before touching memory: the last guard behind the
// Python and operator checks.
#pragma once

#include <cstdint>

extern "C" {

struct PotArgs {
  const float* x;         // [M, K] fp32, contiguous (unused by pot_cpu_decode)
  int64_t M, K, N;        // activation rows, in_features, out_features
  const uint8_t* packed;  // [N, row_bytes] codes, little-endian bit stream per row (format/packing.py)
  int64_t row_bytes;      // must be ceil(K / 8) * bits
  const uint16_t* scale;  // [N, G] fp16 bit patterns
  const uint16_t* offset; // [N, G] fp16 bit patterns, or null (level sets without an offset)
  int64_t G, group_size;  // G must be ceil(K / group_size)
  const float* values;    // [2^bits] unit values L[code]
  int32_t bits;           // 2, 3 or 4
  int32_t int8_shift;     // F: every |L| * 2^F an integer <= 128 (the int8 path), or -1
  const float* bias;      // [N] fp32, or null
  float* y;               // [M, N] fp32 output (unused by pot_cpu_decode)
  int32_t threads;        // threads of the pool (values < 1 mean 1)
  int32_t reserved;
};

enum PotStatus {
  POT_OK = 0,
  POT_BAD_BITS = 1,       // bits not in {2, 3, 4}
  POT_BAD_SIZES = 2,      // negative or too large M, K, N, group size
  POT_BAD_ROW_BYTES = 3,  // row_bytes != ceil(K / 8) * bits
  POT_BAD_GROUPS = 4,     // G != ceil(K / group_size)
  POT_NULL = 5,           // a required pointer is null
  POT_BAD_LEVELS = 6,     // a unit value is not finite
  POT_BAD_SHIFT = 7,      // int8_shift out of range, or some |L| * 2^F is not an integer <= 128
  POT_BAD_RANGE = 8,      // pot_cpu_decode: rows [n0, n1) outside [0, N)
};

int pot_cpu_check(const PotArgs* a);         // everything but x and y
int pot_cpu_check_linear(const PotArgs* a);  // and x, y
const char* pot_cpu_status_message(int status);
int64_t pot_cpu_args_size();
int pot_cpu_has_avx2();
int pot_cpu_gemm_min_m();
int64_t pot_cpu_pool_helper_tasks();  // tasks the pool's helper threads ran so far (in this process)

// A runner of the kernels' parallel work: runs task(ctx, t) for every t in [0, n_tasks) on up to `threads` threads
// and returns 1, or returns 0 (running nothing) to leave the tasks to the kernels' own pool (pot_pool.h). The
// torch operator installs one that runs them on torch's intra-op threads (pot_op.cpp); null: always the own pool.
typedef int (*PotParallelFn)(int64_t n_tasks, int threads, void (*task)(void* ctx, int64_t t), void* ctx);
void pot_cpu_set_parallel(PotParallelFn fn);

// y[M, N] = x @ W.T (+ bias) in fp32, W decoded on the fly (decode-sized M; any M is correct).
int pot_cpu_linear(const PotArgs* a);
// As pot_cpu_linear with x rounded to int8 per row and 64 columns where pot_cpu_i8_supported, else fp32.
int pot_cpu_linear_i8(const PotArgs* a);
int pot_cpu_i8_supported(const PotArgs* a);
// enable 0: the integer path's AVX2 dot product only; 1: AVX512-VNNI where built and supported (the default);
// any other value only asks. Returns whether the integer path uses VNNI now (results are identical either way).
int pot_cpu_i8_vnni(int enable);

// The prefill path's pieces: rows [n0, n1) of W decoded to out[(n1 - n0), Kp] fp32 (Kp = K rounded up to 64), in
// the column order pot_cpu_layout_x writes the activation in (chunk order on the AVX2 path, else natural; columns
// >= K finite); pot_cpu_layout_x writes x [M, K] to out [M, Kp] in that order, zero beyond K.
int pot_cpu_decode(const PotArgs* a, int64_t n0, int64_t n1, float* out);
// The same decode rounded to bfloat16 (nearest, ties to even; bit patterns in out [n1 - n0, Kp]): the prefill
// GEMM's bfloat16 tile, written in one pass.
int pot_cpu_decode_bf16(const PotArgs* a, int64_t n0, int64_t n1, uint16_t* out);
int pot_cpu_layout_x(const PotArgs* a, float* out);

}  // extern "C"
