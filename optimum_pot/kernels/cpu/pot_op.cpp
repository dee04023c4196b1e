// The CPU kernels as a torch operator: optimum_pot_cpu::linear (CPU and Meta implementations).
//
// One dispatch per layer from Python, no Python in the call (torch.compile, torch.export and AOTInductor packages
// keep this op in their graphs and call it from C++). The level set arrives as data: its 2^bits unit values
// (float[]) and its int8 shift (-1: none), so a newly registered family needs no change here.
//
// Only torch/library.h and the Tensor class are included (torch/extension.h would pull in Python and all of ATen's
// functions: ~4x the compile time). Every input is checked here (shapes, dtypes, devices, level values) before
// any pointer is taken; the kernels check the sizes again (pot_cpu_check) as the last guard.
//
//   Tensor linear(Tensor x, Tensor packed, Tensor scale, Tensor? offset, Tensor? bias, float[] levels,
//                 int int8_shift, int group_size, int in_features, bool int8, bool bf16_gemm=False)
//
// x [..., K] any float dtype (computed in fp32, returned in x's dtype); packed uint8 [N, ceil(K/8)*bits]; scale
// and offset float16 [N, ceil(K/group_size)]; bias [N] any float dtype. int8: round decode-sized activations to
// int8 where the integer path runs (pot_cpu_i8_supported), else compute like int8=false. bf16_gemm: the prefill
// GEMM (more than pot_cpu_gemm_min_m() rows) multiplies bfloat16 copies of x and of the decoded tile (fp32
// accumulation, bfloat16 result): 3-5x faster than fp32 where oneDNN has AMX or AVX512-BF16 kernels, slower
// elsewhere, so the caller decides (kernels/cpu/linear.py). The default keeps old exported graphs valid.

#include <ATen/Config.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <vector>

#include "pot_api.h"

namespace {

std::atomic<int> g_threads{0};                   // 0: follow at::get_num_threads()
std::atomic<int64_t> g_tile_floats{int64_t(1) << 22};  // decoded tile of 16 MiB: stays in L3 while the GEMM reads it

int num_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : at::get_num_threads();
}

// The kernels' parallel work runs on torch's intra-op threads when the kernel follows torch's thread count (no
// set_num_threads override): those are the threads awake after torch's own ops (OpenMP spins them for a while), so
// a helper of the kernels' own pool would compete with them for the cores. Measured on 2 cores, an 8192x2048 int8
// GEMV right after an fp32 matmul: 1.64 ms on the own pool, 1.02 ms on torch's threads. With an override (e.g.
// torch on 1 thread and the kernel on 2), inside a parallel region, or when at::parallel_for would run serially
// here (torch on OpenMP but this library built without it: build.py's openmp_flags), the own pool runs them.
#if defined(_OPENMP) || AT_PARALLEL_NATIVE
constexpr bool kTorchPool = true;
#else
constexpr bool kTorchPool = false;
#endif

// A machine busy with other processes: an OpenMP region ends at a barrier that waits for every team thread, and a
// descheduled one arrives a scheduler time slice late (measured: a 0.25 ms GEMV took 4-12 ms at the 90th percentile
// with 2-4 busy processes beside it). So each call measures how long the caller waited beyond its own work; after
// two late calls in a row the own pool (which never waits for a thread that has not started) takes the next
// `g_backoff` calls, doubling (up to 65536) each time torch's threads are late again, reset by a call on time.
std::atomic<int64_t> g_late_ns{500000};  // a wait above this is late (a task is at most ~1/16 of a call's work)
std::atomic<int> g_late_calls{0}, g_own_calls{0}, g_backoff{1024};
std::atomic<int64_t> g_fallbacks{0};

bool on_own_pool_for_now() {
  if (g_own_calls.load(std::memory_order_relaxed) <= 0) return false;
  g_own_calls.fetch_sub(1, std::memory_order_relaxed);
  return true;
}

void note_wait(int64_t wait_ns) {
  if (wait_ns <= g_late_ns.load(std::memory_order_relaxed)) {
    g_late_calls.store(0, std::memory_order_relaxed);
    g_backoff.store(1024, std::memory_order_relaxed);
    return;
  }
  if (g_late_calls.fetch_add(1, std::memory_order_relaxed) + 1 < 2) return;
  g_late_calls.store(0, std::memory_order_relaxed);
  const int n = g_backoff.load(std::memory_order_relaxed);
  g_own_calls.store(n, std::memory_order_relaxed);
  g_backoff.store(std::min(n * 2, 65536), std::memory_order_relaxed);
  g_fallbacks.fetch_add(1, std::memory_order_relaxed);
}

int torch_parallel(int64_t n_tasks, int threads, void (*task)(void*, int64_t), void* ctx) {
  if (g_threads.load(std::memory_order_relaxed) > 0 || threads <= 1 || n_tasks <= 1 || at::in_parallel_region() ||
      on_own_pool_for_now())
    return 0;
  using clock = std::chrono::steady_clock;
  std::atomic<int64_t> next{0};  // tasks are taken dynamically: a thread that starts late takes fewer
  int64_t work_ns = 0;           // the calling thread's (chunk 0's) time in tasks
  const auto t0 = clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t) {
    const auto s = clock::now();
    for (int64_t t = next.fetch_add(1); t < n_tasks; t = next.fetch_add(1)) task(ctx, t);
    if (begin == 0) work_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - s).count();
  });
  const int64_t wall_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
  note_wait(wall_ns - work_ns);
  return 1;
}

// Installed when the operator library is loaded (a function pointer: no thread is started, nothing allocated).
const bool kInstalled = (pot_cpu_set_parallel(kTorchPool ? &torch_parallel : nullptr), true);

int bits_of(c10::ArrayRef<double> levels) {
  const size_t n = levels.size();
  TORCH_CHECK_VALUE(n == 4 || n == 8 || n == 16, "levels must hold the 2^bits unit values of the level set (4, 8 or ",
                    "16 values for 2, 3 or 4 bits), got ", n, ".");
  return n == 4 ? 2 : (n == 8 ? 3 : 4);
}

void check_levels(c10::ArrayRef<double> levels, int64_t int8_shift) {
  for (const double v : levels)
    TORCH_CHECK_VALUE(std::isfinite(v) && double(float(v)) == v, "level values must be finite and exact in fp32, got ",
                      v, ".");
  TORCH_CHECK_VALUE(int8_shift >= -1 && int8_shift <= 15, "int8_shift must be -1 (none) or 0..15, got ", int8_shift,
                    ".");
  if (int8_shift < 0) return;
  for (const double v : levels) {
    const double q = std::fabs(std::ldexp(v, int(int8_shift)));
    TORCH_CHECK_VALUE(q <= 128.0 && q == std::floor(q), "int8_shift=", int8_shift, " does not make level ", v,
                      " an integer of magnitude <= 128 (LevelSet.int8_shift computes it).");
  }
}

void check_groups(const char* what, const at::Tensor& t, const at::Tensor& packed, int64_t groups) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kHalf && t.dim() == 2 && t.sym_size(0) == packed.sym_size(0) &&
                        t.sym_size(1) == groups,
                    "PoT ", what, " must be a float16 tensor of shape (", packed.sym_size(0), ", ", groups, "), got ",
                    t.scalar_type(), " ", t.sym_sizes(), ".");
  TORCH_CHECK(t.device() == packed.device(), "PoT ", what, " is on ", t.device(), ", the packed codes on ",
              packed.device(), "; move them to one device.");
}

// Every input against the format parameters (shared by the CPU and Meta implementations; symbolic sizes work).
int check_inputs(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                 const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                 c10::ArrayRef<double> levels, int64_t int8_shift, int64_t group_size, int64_t in_features) {
  TORCH_CHECK_VALUE(group_size >= 1, "group_size must be a positive integer, got ", group_size, ".");
  TORCH_CHECK_VALUE(in_features >= 1 && in_features <= (int64_t(1) << 40), "in_features must be a positive integer, ",
                    "got ", in_features, ".");
  const int bits = bits_of(levels);
  check_levels(levels, int8_shift);
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte && packed.dim() == 2,
                    "Packed PoT codes must be a 2-D uint8 tensor, got ", packed.scalar_type(), " ", packed.sym_sizes(),
                    ".");
  const int64_t row_bytes = (in_features + 7) / 8 * bits;
  TORCH_CHECK_VALUE(packed.sym_size(1) == row_bytes, "Packed codes have ", packed.sym_size(1), " bytes per row; ",
                    "in_features=", in_features, " at ", bits, " bits needs ", row_bytes,
                    ". The weights do not match the layer's format.");
  const int64_t groups = (in_features + group_size - 1) / group_size;
  check_groups("scale", scale, packed, groups);
  if (offset.has_value()) check_groups("offset", *offset, packed, groups);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 &&
                          bias->sym_size(0) == packed.sym_size(0),
                      "bias must be a float tensor of shape (", packed.sym_size(0), ",), got ", bias->scalar_type(),
                      " ", bias->sym_sizes(), ".");
    TORCH_CHECK(bias->device() == packed.device(), "bias is on ", bias->device(), ", the packed codes on ",
                packed.device(), "; move them to one device.");
  }
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == in_features, "mat1 and mat2 shapes cannot be multiplied: the PoT ",
              "layer takes inputs whose last dimension is in_features=", in_features, ", got shape ", x.sym_sizes(),
              ".");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "PoT linear layers take floating-point inputs (like nn.Linear), ",
              "got ", x.scalar_type(), "; cast x.");
  TORCH_CHECK(x.device() == packed.device(), "Expected all tensors to be on the same device, but the input is on ",
              x.device(), " and the PoT weight on ", packed.device(), "; move the model or the input.");
  return bits;
}

void check_status(int status) {
  TORCH_CHECK(status == POT_OK, "optimum_pot CPU kernel refused its arguments: ", pot_cpu_status_message(status),
              " (status ", status, ").");
}

// Prefill in bfloat16: x rounded once, each tile decoded straight to bfloat16, multiplied into [N, M] bfloat16
// rows (fp32 accumulation inside the GEMM), then transposed and widened to fp32 in one copy.
at::Tensor gemm_bf16(const PotArgs& a, const at::Tensor& xk, int64_t kp, int64_t tile) {
  const at::Tensor xb = xk.to(at::kBFloat16);  // [M, Kp]
  const auto bf = xk.options().dtype(at::kBFloat16);
  at::Tensor buf = xk.new_empty({std::min(tile, a.N), kp}, bf);
  auto* pb = reinterpret_cast<uint16_t*>(buf.data_ptr<at::BFloat16>());
  if (tile >= a.N) {  // one tile: multiply straight into [M, N]
    check_status(pot_cpu_decode_bf16(&a, 0, a.N, pb));
    return xb.mm(buf.t()).to(at::kFloat);
  }
  at::Tensor out = xk.new_empty({a.N, a.M}, bf);  // [N, M]: row tiles are contiguous
  for (int64_t n0 = 0; n0 < a.N; n0 += tile) {
    const int64_t n1 = std::min(a.N, n0 + tile);
    check_status(pot_cpu_decode_bf16(&a, n0, n1, pb));
    at::Tensor rows = out.narrow(0, n0, n1 - n0);  // contiguous [n1 - n0, M]
    at::mm_out(rows, buf.narrow(0, 0, n1 - n0), xb.t());
  }
  at::Tensor y = xk.new_empty({a.M, a.N});
  y.copy_(out.t());  // [M, N] fp32
  return y;
}

// Prefill: the weight decoded tile by tile into a reused fp32 buffer, multiplied by the BLAS GEMM (bfloat16 with
// bf16: gemm_bf16).
at::Tensor gemm(const PotArgs& a, const at::Tensor& x2, const std::optional<at::Tensor>& bias, bool bf16) {
  const int64_t kp = (a.K + 63) / 64 * 64;
  at::Tensor xk = x2.new_empty({a.M, kp});  // [M, Kp]: the decoded tile's column order, zero beyond K
  check_status(pot_cpu_layout_x(&a, xk.data_ptr<float>()));
  const int64_t tile = std::max<int64_t>(8, std::min<int64_t>(a.N, g_tile_floats.load() / kp));
  if (bf16) {
    at::Tensor y = gemm_bf16(a, xk, kp, tile);
    return bias.has_value() ? y.add_(*bias) : y;
  }
  at::Tensor buf = x2.new_empty({std::min(tile, a.N), kp});
  if (tile >= a.N) {  // one tile (every SmolLM2-sized layer): multiply straight into [M, N]
    check_status(pot_cpu_decode(&a, 0, a.N, buf.data_ptr<float>()));
    return bias.has_value() ? bias->addmm(xk, buf.t()) : xk.mm(buf.t());
  }
  at::Tensor out = x2.new_empty({a.N, a.M});  // [N, M]: row tiles are contiguous
  for (int64_t n0 = 0; n0 < a.N; n0 += tile) {
    const int64_t n1 = std::min(a.N, n0 + tile);
    check_status(pot_cpu_decode(&a, n0, n1, buf.data_ptr<float>()));
    out.narrow(0, n0, n1 - n0).addmm_(buf.narrow(0, 0, n1 - n0), xk.t(), 0, 1);  // beta 0: out is not read
  }
  at::Tensor y = out.t().contiguous();  // [M, N]
  if (a.bias != nullptr) {
    float* py = y.data_ptr<float>();
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t n = 0; n < a.N; ++n) py[m * a.N + n] += a.bias[n];
  }
  return y;
}

// `t` as a contiguous tensor of `dtype` (itself when it already is: no dispatch on the decode path).
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype && t.is_contiguous()) return t;
  return t.to(dtype).contiguous();
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                      c10::ArrayRef<double> levels, int64_t int8_shift, int64_t group_size, int64_t in_features,
                      bool int8, bool bf16_gemm) {
  const int bits = check_inputs(x, packed, scale, offset, bias, levels, int8_shift, group_size, in_features);
  TORCH_CHECK(x.device().is_cpu(), "optimum_pot_cpu::linear runs CPU tensors, got ", x.device(), ".");
  const int64_t K = in_features, N = packed.size(0), M = x.numel() / K;
  const at::Tensor x2 = as_contiguous(x, at::kFloat);  // [..., K]: read as [M, K]
  const at::Tensor p = packed.contiguous(), s = scale.contiguous();
  const at::Tensor z = offset.has_value() ? offset->contiguous() : at::Tensor();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(as_contiguous(*bias, at::kFloat)) : std::nullopt;
  float values[16];
  std::copy(levels.begin(), levels.end(), values);
  PotArgs a{};
  a.x = x2.data_ptr<float>();
  a.M = M, a.K = K, a.N = N;
  a.packed = p.data_ptr<uint8_t>(), a.row_bytes = p.size(1);
  a.scale = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  a.offset = z.defined() ? reinterpret_cast<const uint16_t*>(z.data_ptr<at::Half>()) : nullptr;
  a.G = s.size(1), a.group_size = group_size;
  a.values = values, a.bits = bits, a.int8_shift = int32_t(int8_shift);
  a.bias = b.has_value() ? b->data_ptr<float>() : nullptr;
  a.threads = num_threads();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());  // [..., N]
  shape.back() = N;
  at::Tensor y;
  if (M <= pot_cpu_gemm_min_m()) {  // decode: one pass over the packed weight
    y = x2.new_empty(shape);
    a.y = y.data_ptr<float>();
    check_status(int8 ? pot_cpu_linear_i8(&a) : pot_cpu_linear(&a));
  } else {
    y = gemm(a, x2, b, bf16_gemm).view(shape);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                       c10::ArrayRef<double> levels, int64_t int8_shift, int64_t group_size, int64_t in_features,
                       bool /*int8*/, bool /*bf16_gemm*/) {
  check_inputs(x, packed, scale, offset, bias, levels, int8_shift, group_size, in_features);
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = packed.sym_size(0);
  return x.new_empty_symint(shape);
}

}  // namespace

extern "C" {
// Kernel threads (n < 1: follow torch's intra-op thread count); returns the previous setting.
int pot_op_set_threads(int n) { return g_threads.exchange(std::max(n, 0)); }
// Floats per decoded tile of the prefill path (tests use small tiles); returns the previous setting.
int64_t pot_op_set_tile_floats(int64_t n) { return g_tile_floats.exchange(std::max<int64_t>(n, 64)); }
// 1 when the kernels' parallel work runs on torch's intra-op threads (without a set_num_threads override).
int pot_op_torch_pool() { return kInstalled && kTorchPool; }
// Times torch's threads were late twice in a row and the own pool took over for a while (see note_wait).
int64_t pot_op_torch_pool_fallbacks() { return g_fallbacks.load(); }
// The wait (ns) above which a call counts as late; returns the previous value (tests: -1 makes every call late).
int64_t pot_op_set_late_ns(int64_t ns) {
  g_own_calls.store(0);
  g_late_calls.store(0);
  g_backoff.store(1024);
  return g_late_ns.exchange(ns);
}
}

TORCH_LIBRARY(optimum_pot_cpu, m) {
  m.def(
      "linear(Tensor x, Tensor packed, Tensor scale, Tensor? offset, Tensor? bias, float[] levels, int int8_shift, "
      "int group_size, int in_features, bool int8, bool bf16_gemm=False) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(optimum_pot_cpu, CPU, m) { m.impl("linear", TORCH_FN(linear_cpu)); }

TORCH_LIBRARY_IMPL(optimum_pot_cpu, Meta, m) { m.impl("linear", TORCH_FN(linear_meta)); }
