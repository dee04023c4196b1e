"""CPU kernel benchmark: packed PoT matmul (every path: single- and two-term tables, offsets, fp32 and int8
activations) vs fp32 ``F.linear``, torch's int4 CPU kernel and optimum-quanto int4; the per-layer dispatch cost of
the C++ operator vs the former ctypes call; then SmolLM2-135M end to end (decode tokens/s and prefill, PoT 4-bit vs
float vs llama.cpp on the Q4_1 GGUF).

    python bench/cpu_kernels.py            # full run (~15 min on 2 cores)
    python bench/cpu_kernels.py --smoke    # CI: small shapes, few tokens (< 3 min)
    python bench/cpu_kernels.py --prefill  # the M = 512 rows of the kernel table only (~3 min)
    python bench/cpu_kernels.py --e2e-only # SmolLM2 end to end only (~6 min)

Every number is the median of interleaved repetitions (all methods timed in turn, ``--reps`` rounds), so the
ratios printed side by side share the machine's state. Weights rotate over several copies (> 64 MiB in all per
method) so they do not sit in the 32 MiB L3.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from optimum_pot.format.groups import num_groups
from optimum_pot.format.packing import pack
from optimum_pot.format.registry import from_id
from optimum_pot.kernels.cpu import build, ctypes_kernel, linear
from optimum_pot.library.reference import pot_linear_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")
GROUP = 128
ROTATE_BYTES = 64 << 20
MAX_COPIES = [32]  # --smoke lowers it: its small weights are not meant to miss the cache


def copies_for(nbytes: int) -> int:
    return min(MAX_COPIES[0], max(2, -(-ROTATE_BYTES // nbytes)))


def rotating(make, nbytes: int):
    """A callable that cycles through several independently built weights (defeats the L3)."""
    items = [make() for _ in range(copies_for(nbytes))]
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def fp32_method(n, k):
    nxt = rotating(lambda: torch.randn(n, k), n * k * 4)
    return lambda x: torch.nn.functional.linear(x, nxt())


def bf16_method(n, k):
    """``F.linear`` in bfloat16 (weights and activations; the activations' cast is not timed): what a bfloat16 float
    model computes, and the fastest dense prefill on CPUs with AMX or AVX512-BF16."""
    nxt = rotating(lambda: torch.randn(n, k, dtype=torch.bfloat16), n * k * 2)
    cast = {}

    def run(x):
        if cast.get("src") is not x:
            cast.update(src=x, dst=x.bfloat16())
        return torch.nn.functional.linear(cast["dst"], nxt())

    return run


def torch_int4_method(n, k, act_dtype=torch.bfloat16):
    def make():
        q = torch.randint(0, 16, (n, k), dtype=torch.int32)
        scales_zeros = torch.rand(k // GROUP, n, 2).to(torch.bfloat16)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros

    nxt = rotating(make, n * k // 2)

    def run(x):
        # bf16 activations: its fast path. fp32 activations (the 8 ms figure) take a much slower path.
        w, sz = nxt()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(act_dtype), w, GROUP, sz.to(act_dtype))

    return run


def quanto_method(n, k):
    from optimum.quanto import freeze, qint4, quantize

    def make():
        m = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))  # quanto swaps children, not the root
        quantize(m, weights=qint4)
        freeze(m)
        return m

    nxt = rotating(make, n * k // 2)
    return lambda x: nxt()(x)


FP32_LEVELS = ("pot:2", "pot:3", "pot:4", "sp2:3:offset", "sp2:4:offset")  # backend="cpu"
INT8_LEVELS = ("pot:2", "pot:3", "pot:4", "sp2:4:offset")  # backend="cpu_int8" (its GEMM path above GEMM_MIN_M)
SINGLE, TWO_TERM = "pot:4", "sp2:4:offset"  # single-term 4-bit; two-term 4-bit with offsets (the default)
KERNELS = {"cpu": linear.pot_linear_cpu, "cpu_int8": linear.pot_linear_cpu_int8}


def pot_method(n, k, levels, backend):
    """``backend``'s kernel on a random packed weight of level set ``levels`` (offsets when it has them)."""
    ls, fn = from_id(levels), KERNELS[backend]

    def make():
        codes = torch.randint(0, 1 << ls.bits, (n, k), dtype=torch.uint8)
        scale = (torch.rand(n, num_groups(k, GROUP)) * 0.1).to(torch.float16)
        offset = ((torch.rand(n, num_groups(k, GROUP)) - 0.5) * 0.01).to(torch.float16) if ls.offset else None
        return pack(codes, ls.bits), scale, offset

    nxt = rotating(make, n * k * ls.bits // 8)

    def run(x):
        p, s, z = nxt()
        return fn(x, p, s, z, None, ls, GROUP, k)

    return run


def interleaved(methods: dict, x: torch.Tensor, reps: int, clock=time.perf_counter) -> dict:
    """Median seconds per call of each method, timed in turn ``reps`` times after one warm-up call each.

    A method whose warm-up call takes over 2 s is timed in the first round only (keeps the full run ~10 min).
    """
    times = {name: [] for name in methods}
    slow = set()
    for name, fn in methods.items():
        t0 = time.perf_counter()
        fn(x)
        if time.perf_counter() - t0 > 2.0:
            slow.add(name)
    for r in range(reps):
        for name, fn in methods.items():
            if r and name in slow:
                continue
            t0 = clock()
            fn(x)
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def check_correct() -> float:
    """Max relative error of the kernel vs the reference on one random two-term layer (sanity before timing)."""
    ls = from_id(TWO_TERM)
    packed, scale = pack(torch.randint(0, 16, (300, 1000), dtype=torch.uint8), 4), torch.rand(300, 8).half()
    offset = (torch.rand(300, 8) * 0.01).half()
    x = torch.randn(3, 1000)
    ref = pot_linear_reference(x, packed, scale, offset, None, ls, GROUP, 1000)
    y = linear.pot_linear_cpu(x, packed, scale, offset, None, ls, GROUP, 1000)
    return ((y - ref).abs().max() / ref.abs().max()).item()


def kernel_table(shapes, ms, reps, quanto_reps, clock=time.perf_counter):
    """PoT ``cpu`` (fp32 activations) and ``cpu_int8`` (= ``auto``: int8 activations at decode rows; above
    ``GEMM_MIN_M`` rows the GEMM path, in bfloat16 on AMX/AVX512-BF16 CPUs, else as ``cpu``) for several level
    sets, beside the baselines (fp32 and bfloat16 ``F.linear``, torch int4, quanto int4); ratios side by side."""
    what = "wall" if clock is time.perf_counter else "CPU (thread) time, 1 thread"
    print(f"\n## GEMV/GEMM {what}, group size {GROUP}, median of {reps} interleaved runs (ms); ratio = other / PoT, "
          f"PoT = {TWO_TERM} (the default)")  # fmt: skip
    head = ["K x N", "M", "fp32", "int4(torch)", "int4 fp32-act", "quanto int4"] + [f"cpu {v}" for v in FP32_LEVELS]
    head += [f"int8 {v}" for v in INT8_LEVELS] + ["bf16"]
    head += [f"{TWO_TERM} / {SINGLE} cpu", f"{TWO_TERM} / {SINGLE} int8", "fp32/PoT", "int4/PoT", "quanto/PoT",
             "fp32/PoT int8", "int4/PoT int8", "int4 fp32-act/PoT int8", "bf16/PoT int8"]  # fmt: skip
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    rows = []
    for k, n in shapes:
        methods = {"fp32": fp32_method(n, k), "int4": torch_int4_method(n, k), "bf16": bf16_method(n, k)}
        methods.update({f"cpu {v}": pot_method(n, k, v, "cpu") for v in FP32_LEVELS})
        methods.update({f"int8 {v}": pot_method(n, k, v, "cpu_int8") for v in INT8_LEVELS})
        quanto, int4_f32 = quanto_method(n, k), torch_int4_method(n, k, torch.float32)
        for m in ms:
            x = torch.randn(m, k)
            t = interleaved(methods, x, reps, clock)
            slow = {"quanto": quanto, **({"int4f32": int4_f32} if m <= linear.GEMM_MIN_M else {})}  # fewer runs
            t.update(interleaved(slow, x, quanto_reps, clock))
            pot, pot_i8 = t[f"cpu {TWO_TERM}"], t[f"int8 {TWO_TERM}"]
            cells = [f"{k}x{n}", str(m)] + [f"{t[c] * 1e3:.2f}" if c in t else "" for c in ("fp32", "int4", "int4f32")]
            cells += [f"{t['quanto'] * 1e3:.2f}"] + [f"{t[c] * 1e3:.2f}" for c in head[6 : 6 + len(FP32_LEVELS)]]
            cells += [f"{t[f'int8 {v}'] * 1e3:.2f}" for v in INT8_LEVELS] + [f"{t['bf16'] * 1e3:.2f}"]
            cells += [f"{pot / t[f'cpu {SINGLE}']:.3f}", f"{pot_i8 / t[f'int8 {SINGLE}']:.3f}"]
            cells += [f"{t[c] / pot:.2f}x" for c in ("fp32", "int4", "quanto")]
            cells += [f"{t[c] / pot_i8:.2f}x" if c in t else "" for c in ("fp32", "int4", "int4f32", "bf16")]
            print("| " + " | ".join(cells) + " |", flush=True)
            rows.append((k, n, m, t))
        del methods, quanto, int4_f32
    return rows


def dispatch_table(reps: int, calls: int = 500):
    """Per-call cost of reaching the kernel, on a layer so small (64 x 8) that the GEMV itself takes ~1 us: the
    kernel-only library through ``ctypes`` and a Python wrapper (how the kernel was called before it became an
    operator) beside the C++ operator, called directly, through the kernel function eager ``PoTLinear`` calls, and
    through the layer; and the Python-implemented ``pot_linear_infer`` op. Median us per call of interleaved
    batches of ``calls`` calls, in the calling thread's CPU time (a 1-task layer runs on the caller; robust to
    other processes taking the cores)."""
    from optimum_pot.library.ops import pot_linear_infer
    from optimum_pot.nn import PoTLinear

    ls = from_id(TWO_TERM)
    q = PoTLinear.from_float(torch.nn.Linear(64, 8), ls, 64, backend="cpu").eval()
    x = torch.randn(1, 64)
    args = (x, q.weight, q.weight_scale, q.weight_offset, q.bias.detach())
    build.load_op()
    plain = ctypes_kernel.bind(build.load_kernel())
    op, shift, threads = torch.ops.optimum_pot_cpu.linear, ls.int8_shift, linear.num_threads()
    methods = {
        "ctypes + Python wrapper (before)": lambda: ctypes_kernel.linear(plain, *args, ls, 64, 64, False, threads),
        "C++ op, through the kernel function (after; what eager PoTLinear calls)": lambda: linear.pot_linear_cpu(
            *args, ls, 64, 64
        ),
        "C++ op, called directly": lambda: op(*args, ls.values, shift, 64, 64, False),
        "PoTLinear.forward (eager, no_grad)": lambda: q(x),
        "optimum_pot::pot_linear_infer (Python-implemented op)": lambda: pot_linear_infer(*args, ls.id, 64, 64, "cpu"),
        "torch.add of two 8-float tensors (a minimal ATen op, for scale)": lambda: torch.add(q.bias, q.bias),
    }
    times = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn()
        for _ in range(reps):
            for name, fn in methods.items():
                t0 = time.thread_time()
                for _ in range(calls):
                    fn()
                times[name].append((time.thread_time() - t0) / calls)
    med = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    before = med["ctypes + Python wrapper (before)"]
    print(f"\n## Dispatch cost per layer call (64x8 layer, {TWO_TERM}, M=1), thread CPU time, median of {reps} "
          f"batches of {calls}")  # fmt: skip
    print("| path | us/call | vs ctypes |\n|---|---|---|")
    for name, us in med.items():
        print(f"| {name} | {us:.1f} | {us / before:.2f}x |")
    after = med["C++ op, through the kernel function (after; what eager PoTLinear calls)"]
    print(f"per-layer call overhead, C++ op vs ctypes: {after:.1f} vs {before:.1f} us ({after - before:+.1f} us)")
    return med


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes and few tokens (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-e2e", action="store_true", help="kernels only")
    parser.add_argument("--compile", action="store_true", help="also try a static cache + torch.compile decode")
    parser.add_argument("--prefill", action="store_true", help="kernel table at M = 512 only (no dispatch, no e2e)")
    parser.add_argument("--e2e-only", action="store_true", help="SmolLM2 end to end only (no kernel tables)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    build.load_op()
    capability = torch.backends.cpu.get_cpu_capability()
    built = ", ".join(f"{t} built in {s:.1f} s" for t, s in build.BUILD_SECONDS.items()) or "cached"
    print(f"# CPU kernels: torch {torch.__version__}, {args.threads} threads, {capability}")
    print(f"kernel operator build/load {time.perf_counter() - t0:.1f} s ({built}); max rel. error vs reference "
          f"{check_correct():.2e}")  # fmt: skip
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share the machine when > ~0.5)")
    if args.e2e_only:
        from cpu_e2e import end_to_end  # bench/ is on sys.path when run as a script

        return end_to_end(smoke=args.smoke, threads=args.threads, try_compile=args.compile)
    if args.prefill:
        kernel_table([(4096, 4096), (4096, 11008), (11008, 4096)], [512], args.reps or 5, 1)
        return
    dispatch_table(5 if args.smoke else 15)
    if args.smoke:
        MAX_COPIES[0] = 2
        kernel_table([(1024, 2816)], [1, 8, 512], args.reps or 3, 1)
    else:
        shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
        kernel_table(shapes, [1, 8, 128, 512], args.reps or 5, 2)
        # The same work measured as the calling thread's CPU time with one thread: robust to other processes
        # taking the cores (a descheduled helper thread stalls every threaded kernel's wall time).
        torch.set_num_threads(1)
        linear.set_num_threads(1)
        kernel_table(shapes, [1, 8], args.reps or 5, 1, clock=time.thread_time)
        torch.set_num_threads(args.threads)
        linear.set_num_threads(None)
    if not args.no_e2e:
        from cpu_e2e import end_to_end  # bench/ is on sys.path when run as a script

        end_to_end(smoke=args.smoke, threads=args.threads, try_compile=args.compile)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
