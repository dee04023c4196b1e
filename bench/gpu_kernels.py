"""GPU kernel benchmark: PoT (exponent-field addition) vs uniform int4 ``(q − z)·s`` vs float16 cuBLAS.

Both quantised variants run the *same* Triton kernels (``optimum_pot/kernels/triton``), only the in-register decode
differs, so the ratio isolates the cost of decoding. Two measurements per Llama-7B projection shape:

* dequantise-only: packed weight → float16 ``[N, K]`` in memory;
* fused matmul ``y = x @ W.T`` for ``M`` ∈ {1, 16, 128, 2048} (GEMV for ``M ≤ 8``, GEMM otherwise), against
  ``torch.nn.functional.linear`` on the float16 weight (cuBLAS).

Every kernel output is checked against the reference op before it is timed. Times are medians of
``triton.testing.do_bench``; ratios are taken within one run. Without a CUDA device it prints "no CUDA device" and
exits 0 (the correctness of the kernels is proven on the CPU by ``tests/test_triton_kernel.py``).

Usage: ``python bench/gpu_kernels.py [--smoke] [--out results.md]``.
"""

import argparse
import sys
from functools import partial

import torch

LLAMA_7B_SHAPES = {  # name: (K = in_features, N = out_features)
    "q/k/v/o_proj": (4096, 4096),
    "gate/up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}
M_VALUES = (1, 16, 128, 2048)
GROUP_SIZE = 128


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one shape, M ∈ {1, 16}, few repetitions")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], help="PoT bit widths to time (4 first)")
    p.add_argument("--out", default=None, help="also write the markdown tables to this file")
    return p.parse_args(argv)


def make_weights(k: int, n: int, bits: int, device: str):
    """A PoT weight at ``bits`` and a uniform int4 weight of the same shape (random codes: speed is data-blind)."""
    from optimum_pot.format.levels import num_groups
    from optimum_pot.format.packing import pack
    from optimum_pot.kernels.triton.launch import PackedWeight

    g = num_groups(k, GROUP_SIZE)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    scale = (torch.rand(n, g, device=device) * 0.05 + 1e-3).half()
    pot = PackedWeight(pack(codes, bits), scale, None, bits, GROUP_SIZE, k, True)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    zero = torch.randint(0, 16, (n, g), device=device).half()
    uniform = PackedWeight(pack(q, 4), scale * 0.1, zero, 4, GROUP_SIZE, k, False)
    return pot, uniform


def reference_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight in plain PyTorch: the reference PoT decode, or ``(q − z)·s`` for the uniform baseline."""
    from optimum_pot.format.levels import expand_groups
    from optimum_pot.format.packing import unpack
    from optimum_pot.library.reference import dequantize_weight

    w = weight
    if w.zero is None:
        return dequantize_weight(w.packed, w.scale, w.bits, w.group_size, w.in_features, w.zero_level, dtype)
    q = unpack(w.packed, w.bits, w.in_features).float()
    full = lambda t: expand_groups(t.float(), w.group_size, w.in_features)  # [N, G] -> [N, K]
    return ((q - full(w.zero)) * full(w.scale)).to(dtype)


def check(weight, x) -> None:
    """Kernel outputs (fused and dequantise-only) against plain PyTorch, before anything is timed."""
    from optimum_pot.kernels.triton import launch

    w = reference_weight(weight, x.dtype)
    if not torch.equal(launch.dequantize(weight, x.dtype), w):
        raise RuntimeError("The Triton dequantise kernel disagrees with the reference decode.")
    expected = torch.nn.functional.linear(x, w).float()
    err = (
        (launch.linear(x, weight, None).float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
    ).item()
    if err > 1e-2:
        raise RuntimeError(f"The Triton matmul disagrees with the reference (relative max error {err:.2e}).")


def bench_ms(fn, smoke: bool) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5 if smoke else 25, rep=20 if smoke else 100, return_mode="median")


def dequant_rows(shapes, bits_list, smoke) -> list[str]:
    from optimum_pot.kernels.triton import launch

    rows = []
    for name, (k, n) in shapes.items():
        weights = {f"PoT{bits}": make_weights(k, n, bits, "cuda")[0] for bits in bits_list}
        weights["int4"] = make_weights(k, n, 4, "cuda")[1]
        times = {key: bench_ms(partial(launch.dequantize, w, torch.float16), smoke) for key, w in weights.items()}
        pot_key = f"PoT{bits_list[0]}"
        cells = " | ".join(f"{times[key] * 1e3:.1f}" for key in times)
        rows.append(f"| {name} {n}×{k} | {cells} | {times['int4'] / times[pot_key]:.2f}× |")
    return rows


def matmul_rows(shapes, bits_list, m_values, smoke) -> list[str]:
    from optimum_pot.kernels.triton import launch

    rows = []
    for name, (k, n) in shapes.items():
        weights = {bits: make_weights(k, n, bits, "cuda") for bits in bits_list}
        uniform = weights[bits_list[0]][1]
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            quantised = {f"PoT{bits}": pot for bits, (pot, _) in weights.items()} | {"int4": uniform}
            for weight in quantised.values():
                check(weight, x)
            runs = {key: partial(launch.linear, x, weight, None) for key, weight in quantised.items()}
            runs["fp16"] = partial(torch.nn.functional.linear, x, w16)
            times = {key: bench_ms(fn, smoke) for key, fn in runs.items()}
            pot_t = times[f"PoT{bits_list[0]}"]
            cells = " | ".join(f"{times[key] * 1e3:.1f}" for key in times)
            rows.append(f"| {name} | {m} | {cells} | {times['int4'] / pot_t:.2f}× | {times['fp16'] / pot_t:.2f}× |")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU kernel timings are unmeasured on this machine (nothing to do).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("backend='triton' needs `pip install triton`; skipping the GPU kernel benchmark.")
        return 0
    torch.manual_seed(0)
    shapes = dict(list(LLAMA_7B_SHAPES.items())[:1]) if args.smoke else LLAMA_7B_SHAPES
    m_values = (1, 16) if args.smoke else M_VALUES
    bits = args.bits
    pot_cols = " | ".join(f"PoT{b} µs" for b in bits)
    sep = "|---" * (len(bits) + 3) + "|"
    out = [
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"group size {GROUP_SIZE}, float16 activations; times are medians in µs.",
        "",
        "Dequantise-only (packed → float16 [N, K]):",
        "",
        f"| shape N×K | {pot_cols} | int4 µs | int4 / PoT{bits[0]} |",
        sep,
        *dequant_rows(shapes, bits, args.smoke),
        "",
        "Fused matmul y = x @ W.T:",
        "",
        f"| shape | M | {pot_cols} | int4 µs | fp16 cuBLAS µs | int4 / PoT{bits[0]} | cuBLAS / PoT{bits[0]} |",
        "|---" * (len(bits) + 6) + "|",
        *matmul_rows(shapes, bits, m_values, args.smoke),
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
