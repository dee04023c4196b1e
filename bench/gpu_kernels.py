"""GPU kernel benchmark: single-term vs two-term level sets (exponent-field adds) vs uniform int4 vs float16 cuBLAS.

Every quantised variant runs the *same* Triton kernels (``optimum_pot/kernels/triton``), only the in-register decode
differs, so the ratios isolate the cost of decoding: one exponent-field add per weight (single-term ``pot:4``), two
adds and a float add (two-term ``sp2:4``), plus the per-group offset (``sp2:4:offset``, ``int:4:offset``), against
the uniform int4 baseline ``(q − z)·s`` (convert, subtract, multiply). Two measurements per Llama-7B projection shape:

* dequantise-only: packed weight → float16 ``[N, K]`` in memory;
* fused matmul ``y = x @ W.T`` for ``M`` ∈ {1, 16, 128, 2048} (GEMV for ``M ≤ 8``, GEMM otherwise), against
  ``torch.nn.functional.linear`` on the float16 weight (cuBLAS).

Every kernel output is checked against the reference decode before it is timed. Times are medians of
``triton.testing.do_bench``; ratios are taken within one run, each variant's time over the first level set's. Without
a CUDA device it prints "no CUDA device" and exits 0 (the correctness of the kernels is proven on the CPU by
``tests/test_triton_kernel.py``).

Usage: ``python bench/gpu_kernels.py [--smoke] [--levels pot:4 sp2:4 ...] [--out results.md]``.
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
DEFAULT_LEVELS = ["pot:4", "sp2:4", "sp2:4:offset", "int:4:offset"]
UNIFORM = "int4 (q−z)·s"  # the baseline's column name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one shape, M ∈ {1, 16}, few repetitions")
    p.add_argument("--levels", nargs="+", default=DEFAULT_LEVELS,
                   help="level-set ids to time; ratios are over the first (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the markdown tables to this file")
    return p.parse_args(argv)


def make_weights(k: int, n: int, level_ids: list[str], device: str) -> dict:
    """A packed weight per level set plus the uniform int4 baseline, all ``[N, K]`` (random codes, scales and
    offsets: speed is data-blind)."""
    from optimum_pot.format.groups import num_groups
    from optimum_pot.format.packing import pack
    from optimum_pot.format.registry import from_id, get_level_set
    from optimum_pot.kernels.triton.launch import PackedWeight

    g = num_groups(k, GROUP_SIZE)
    scale = (torch.rand(n, g, device=device) * 0.05 + 1e-3).half()
    offset = (torch.randn(n, g, device=device) * 0.01).half()
    weights = {}
    for level_id in level_ids:
        ls = from_id(level_id)
        codes = torch.randint(0, 1 << ls.bits, (n, k), dtype=torch.uint8, device=device)
        weights[ls.id] = PackedWeight(pack(codes, ls.bits), scale, offset if ls.offset else None, ls, GROUP_SIZE, k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    zero = torch.randint(0, 16, (n, g), device=device).half()
    weights[UNIFORM] = PackedWeight(pack(q, 4), scale * 0.1, zero, get_level_set("int", 4), GROUP_SIZE, k, uniform=True)
    return weights


def reference_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight in plain PyTorch: the reference decode, or ``(q − z)·s`` for the uniform baseline."""
    from optimum_pot.format.groups import expand_groups
    from optimum_pot.format.packing import unpack
    from optimum_pot.format.weights import dequantize_weight

    w = weight
    if not w.uniform:
        return dequantize_weight(w.packed, w.scale, w.offset, w.level_set, w.group_size, w.in_features, dtype)
    q = unpack(w.packed, w.bits, w.in_features).float()
    full = lambda t: expand_groups(t.float(), w.group_size, w.in_features)  # [N, G] -> [N, K]
    return ((q - full(w.offset)) * full(w.scale)).to(dtype)


def check(weight, x) -> None:
    """Kernel outputs (fused and dequantise-only) against plain PyTorch, before anything is timed."""
    from optimum_pot.kernels.triton import launch

    w = reference_weight(weight, x.dtype)
    if not torch.equal(launch.dequantize(weight, x.dtype), w):
        raise RuntimeError(f"The Triton dequantise kernel disagrees with the reference decode ({weight.level_set.id}).")
    expected = torch.nn.functional.linear(x, w).float()
    err = (
        (launch.linear(x, weight, None).float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
    ).item()
    if err > 1e-2:
        raise RuntimeError(f"The Triton matmul disagrees with the reference (relative max error {err:.2e}).")


def bench_ms(fn, smoke: bool) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5 if smoke else 25, rep=20 if smoke else 100, return_mode="median")


def cells(times: dict, first: str) -> str:
    """``µs`` per variant, then each other variant's time over ``first``'s."""
    us = " | ".join(f"{t * 1e3:.1f}" for t in times.values())
    ratios = " | ".join(f"{t / times[first]:.2f}×" for key, t in times.items() if key != first)
    return f"{us} | {ratios}"


def dequant_rows(shapes, level_ids, smoke) -> list[str]:
    from optimum_pot.kernels.triton import launch

    rows = []
    for name, (k, n) in shapes.items():
        weights = make_weights(k, n, level_ids, "cuda")
        for weight in weights.values():
            check(weight, torch.randn(1, k, device="cuda", dtype=torch.float16))
        times = {key: bench_ms(partial(launch.dequantize, w, torch.float16), smoke) for key, w in weights.items()}
        rows.append(f"| {name} {n}×{k} | {cells(times, level_ids[0])} |")
    return rows


def matmul_rows(shapes, level_ids, m_values, smoke) -> list[str]:
    from optimum_pot.kernels.triton import launch

    rows = []
    for name, (k, n) in shapes.items():
        weights = make_weights(k, n, level_ids, "cuda")
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16)
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for weight in weights.values():
                check(weight, x)
            runs = {key: partial(launch.linear, x, weight, None) for key, weight in weights.items()}
            runs["fp16 cuBLAS"] = partial(torch.nn.functional.linear, x, w16)
            times = {key: bench_ms(fn, smoke) for key, fn in runs.items()}
            rows.append(f"| {name} | {m} | {cells(times, level_ids[0])} |")
    return rows


def header(first_cols: list[str], variants: list[str]) -> list[str]:
    """Markdown header: time columns per variant, then ratio columns over the first."""
    cols = first_cols + [f"{v} µs" for v in variants] + [f"{v} / {variants[0]}" for v in variants[1:]]
    return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU kernel timings are unmeasured on this machine (nothing to do).")
        return 0
    try:
        import triton
    except ImportError:
        print("backend='triton' needs `pip install triton`; skipping the GPU kernel benchmark.")
        return 0
    from optimum_pot.format.registry import from_id

    torch.manual_seed(0)
    level_ids = [from_id(level_id).id for level_id in args.levels]  # validates the ids (clear error)
    shapes = dict(list(LLAMA_7B_SHAPES.items())[:1]) if args.smoke else LLAMA_7B_SHAPES
    m_values = (1, 16) if args.smoke else M_VALUES
    variants = [*level_ids, UNIFORM]
    out = [
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"group size {GROUP_SIZE}, float16 activations and scales; times are medians in µs, ratios are times over "
        f"{level_ids[0]}'s (below 1: faster).",
        "",
        "Dequantise-only (packed → float16 [N, K]):",
        "",
        *header(["shape N×K"], variants),
        *dequant_rows(shapes, level_ids, args.smoke),
        "",
        "Fused matmul y = x @ W.T:",
        "",
        *header(["shape", "M"], [*variants, "fp16 cuBLAS"]),
        *matmul_rows(shapes, level_ids, m_values, args.smoke),
    ]
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
