"""CPU kernel benchmark: packed PoT matmul vs fp32 ``F.linear``, torch's int4 CPU kernel and optimum-quanto int4,
then SmolLM2-135M end to end (decode tokens/s and prefill, PoT 4-bit vs float vs llama.cpp on the Q4_1 GGUF).

    python bench/cpu_kernels.py            # full run (~10 min on 2 cores)
    python bench/cpu_kernels.py --smoke    # CI: small shapes, few tokens (< 2 min)

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

from optimum_pot.format.levels import num_groups
from optimum_pot.format.packing import pack
from optimum_pot.kernels.cpu.build import load_library
from optimum_pot.kernels.cpu.linear import GEMM_MIN_M, pot_linear_cpu, pot_linear_cpu_int8
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


def pot_method(n, k, bits, int8=False):
    fn = pot_linear_cpu_int8 if int8 else pot_linear_cpu

    def make():
        codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
        return pack(codes, bits), (torch.rand(n, num_groups(k, GROUP)) * 0.1).to(torch.float16)

    nxt = rotating(make, n * k * bits // 8)

    def run(x):
        p, s = nxt()
        return fn(x, p, s, None, bits, GROUP, k, True)

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
    """Max relative error of the kernel vs the reference on one random layer (sanity before timing)."""
    packed, scale = pack(torch.randint(0, 16, (300, 1000), dtype=torch.uint8), 4), torch.rand(300, 8).half()
    x = torch.randn(3, 1000)
    ref = pot_linear_reference(x, packed, scale, None, 4, GROUP, 1000, True)
    return ((pot_linear_cpu(x, packed, scale, None, 4, GROUP, 1000, True) - ref).abs().max() / ref.abs().max()).item()


def kernel_table(shapes, ms, bits_list, reps, quanto_reps, clock=time.perf_counter):
    """PoT ``cpu`` (fp32 activations) for ``bits_list`` and ``cpu_int8`` (int8 activations; decode rows
    only: above ``GEMM_MIN_M`` rows it runs the same GEMM path as ``cpu``) beside the three baselines."""
    rows = []
    what = "wall" if clock is time.perf_counter else "CPU (thread) time, 1 thread"
    i8_bits = [b for b in (2, 3, 4) if b in bits_list]
    print(f"\n## GEMV/GEMM {what}, group size {GROUP}, median of {reps} interleaved runs (ms); ratio = other / PoT")
    head = ["K x N", "M", "fp32", "int4(torch)", "int4 fp32-act", "quanto int4"] + [f"PoT {b}b" for b in bits_list]
    head += [f"PoT {b}b int8" for b in i8_bits]
    head += ["fp32/PoT4", "int4/PoT4", "quanto/PoT4", "fp32/PoT4 int8", "int4/PoT4 int8", "int4 fp32-act/PoT4 int8"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for k, n in shapes:
        methods = {"fp32": fp32_method(n, k), "int4": torch_int4_method(n, k)}
        methods.update({f"pot{b}": pot_method(n, k, b) for b in bits_list})
        int8_methods = {f"pot{b}i8": pot_method(n, k, b, int8=True) for b in i8_bits}
        quanto, int4_f32 = quanto_method(n, k), torch_int4_method(n, k, torch.float32)
        for m in ms:
            x = torch.randn(m, k)
            t = interleaved({**methods, **(int8_methods if m <= GEMM_MIN_M else {})}, x, reps, clock)
            slow = {"quanto": quanto, **({"int4f32": int4_f32} if m <= GEMM_MIN_M else {})}  # timed fewer times
            t.update(interleaved(slow, x, quanto_reps, clock))
            p4 = t.get("pot4", t[f"pot{bits_list[-1]}"])
            p4i8 = t.get("pot4i8", t.get(f"pot{i8_bits[-1]}i8")) if i8_bits else None
            cells = [f"{k}x{n}", str(m)] + [
                f"{t[c] * 1e3:.2f}" if c in t else "" for c in ["fp32", "int4", "int4f32", "quanto"]
            ]
            cells += [f"{t[f'pot{b}'] * 1e3:.2f}" for b in bits_list]
            cells += [f"{t[f'pot{b}i8'] * 1e3:.2f}" if f"pot{b}i8" in t else "(= PoT)" for b in i8_bits]
            cells += [f"{t[c] / p4:.2f}x" for c in ["fp32", "int4", "quanto"]]
            cells += [f"{t[c] / p4i8:.2f}x" if p4i8 and c in t else "" for c in ["fp32", "int4", "int4f32"]]
            print("| " + " | ".join(cells) + " |", flush=True)
            rows.append((k, n, m, t))
        del methods, int8_methods, quanto, int4_f32
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes and few tokens (CI)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--no-e2e", action="store_true", help="kernels only")
    parser.add_argument("--compile", action="store_true", help="also try a static cache + torch.compile decode")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    load_library()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"# CPU kernels: torch {torch.__version__}, {args.threads} threads, {capability}")
    print(f"kernel build/load {time.perf_counter() - t0:.1f} s; max rel. error vs reference {check_correct():.2e}")
    print(f"load average at start: {os.getloadavg()[0]:.1f} (other processes share the machine when > ~0.5)")
    if args.smoke:
        MAX_COPIES[0] = 2
        kernel_table([(1024, 2816)], [1, 8, 128], [2, 3, 4], args.reps or 3, 1)
    else:
        shapes = [(4096, 4096), (4096, 11008), (11008, 4096)]
        kernel_table(shapes, [1, 8, 128, 512], [2, 3, 4], args.reps or 5, 2)
        # The same work measured as the calling thread's CPU time with one thread: robust to other processes
        # taking the cores (a descheduled helper thread stalls every threaded kernel's wall time).
        torch.set_num_threads(1)
        kernel_table(shapes, [1, 8], [2, 3, 4], args.reps or 5, 1, clock=time.thread_time)
        torch.set_num_threads(args.threads)
    if not args.no_e2e:
        from cpu_e2e import end_to_end  # bench/ is on sys.path when run as a script

        end_to_end(smoke=args.smoke, threads=args.threads, try_compile=args.compile)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
