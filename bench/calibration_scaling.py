"""What calibration costs on a larger model: time and memory to calibrate ONE decoder block of a synthetic model.

A Llama block of the chosen shape (random weights; the cost does not depend on their values) is quantised, its
inputs caught from random token ids, and the calibration of that one block timed (wall and CPU) exactly as
``calibrate()`` runs it (``sequential.gptq_block``), with the process's peak resident memory sampled. From it, an
**estimate** for a whole 7B model (Llama-2-7B: 32 blocks, hidden 4096, MLP 11008) scales each part by its work:
forwards and Hessians grow with tokens × (block weights, Σ K²), rounding with Σ N·K² + Σ K³ (Cholesky).

    python bench/calibration_scaling.py             # Llama-1B-shaped block: hidden 2048, MLP 8192, 32 × 512 tokens
    python bench/calibration_scaling.py --shape 7b  # one real 7B-shaped block (slow on 2 cores; needs ~4 GB)
    python bench/calibration_scaling.py --smoke     # tiny shape, seconds (CI)
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_utils import PeakRSS  # noqa: E402

SHAPES = {  # hidden, MLP, heads, kv heads, blocks of the whole model
    "smoke": (128, 512, 4, 2, 2),
    "1b": (2048, 8192, 32, 8, 16),  # Llama-3.2-1B
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
}
# Assumptions of the GPU estimate (no GPU measured here): sustained TF32 matmul rate, and the per-column rounding
# loop bound by kernel launches (~10 small kernels of ~10 µs per column).
GPU_FLOPS, GPU_COLUMN_SECONDS = 50e12, 10 * 10e-6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--smoke", action="store_true", help="tiny shape and 2 × 64 tokens (CI)")
    p.add_argument("--samples", type=int, default=32, help="calibration samples (default: the PoTConfig default)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--levels", default="sp2")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.samples, args.seq_len = "smoke", 2, 64
    return args


def block_work(hidden: int, mlp: int, heads: int, kv_heads: int) -> dict[str, float]:
    """Per block: weights, Σ K² of the stage inputs (Hessians), Σ N·K² and Σ K³ of the rounding, Σ K (columns)."""
    kv = hidden * kv_heads // heads
    # (N, K) of q, k, v, o, gate, up, down
    attn, mlps = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)], [(mlp, hidden), (mlp, hidden)]
    layers = attn + mlps + [(hidden, mlp)]
    stage_k = [hidden, hidden, hidden, mlp]  # q/k/v share one input, gate/up another
    return {
        "weights": sum(n * k for n, k in layers),
        "hessian": sum(k * k for k in stage_k),
        "rounding": sum(n * k * k for n, k in layers) + 1.7 * sum(k**3 for k in stage_k),
        "columns": sum(k for k in stage_k),
    }


def build(shape: str, args):
    """A one-block Llama of ``shape``, quantised, with its float weights kept as calibration targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_pot import PoTConfig, quantize

    hidden, mlp, heads, kv_heads, _ = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=256,
                      max_position_embeddings=args.seq_len, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.startswith("model.layers")
              and isinstance(m, torch.nn.Linear)}  # fmt: skip
    qcfg = PoTConfig(bits=args.bits, group_size=args.group_size, levels=args.levels, num_samples=args.samples,
                     seq_len=args.seq_len)  # fmt: skip
    quantize(model, qcfg)
    for name, w in floats.items():
        model.get_submodule(name)._float_weight = w
    return model, qcfg


def measure(args) -> dict:
    from optimum_pot.calibration.blocks import capture_inputs, find_blocks
    from optimum_pot.calibration.sequential import gptq_block, work_block
    from optimum_pot.calibration.weights import FloatWeights

    model, cfg = build(args.shape, args)
    prefix, blocks = find_blocks(model)
    ids = torch.randint(0, 256, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(model, blocks[0], ids, torch.device("cpu"))
    hidden, inputs.hidden = [h.float() for h in inputs.hidden], []
    from optimum_pot.calibration.blocks import block_output

    with torch.no_grad():  # one float forward over all samples: the unit the forwards of calibration are made of
        wb = work_block(blocks[0], {n: m._float_weight for n, m in blocks[0].named_modules() if hasattr(m, "bits")})
        t0 = time.perf_counter()
        for x in hidden:
            block_output(wb, x, inputs)
        forward = time.perf_counter() - t0
        del wb
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as mem:
        _, row = gptq_block(f"{prefix}.0", blocks[0], FloatWeights(model), inputs, hidden, cfg, progress=False)
    row.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0, forward_seconds=forward,
               rss_before_mb=mem.start / 2**20, rss_peak_mb=mem.peak / 2**20)  # fmt: skip
    return row


def estimate(row: dict, measured: str, target: str, tokens: int) -> dict:
    """Whole-model estimate for ``target`` from one measured ``measured``-shaped block (CPU), and a GPU estimate."""
    a, b = block_work(*SHAPES[measured][:4]), block_work(*SHAPES[target][:4])
    blocks = SHAPES[target][4]
    token_part = row["seconds"] - row["rounding_seconds"]  # forwards + Hessians: ∝ tokens × (weights, Σ K²)
    passes = row["forward_seconds"] and (token_part / row["forward_seconds"])
    ratio_tokens = (passes * 2 * b["weights"] + 2 * b["hessian"]) / (passes * 2 * a["weights"] + 2 * a["hessian"])
    ratio_round = b["rounding"] / a["rounding"]
    cpu_block = token_part * ratio_tokens + row["rounding_seconds"] * ratio_round
    flops = tokens * (passes * 2 * b["weights"] + 2 * b["hessian"]) + 2 * b["rounding"]
    gpu_block = flops / GPU_FLOPS + b["columns"] * GPU_COLUMN_SECONDS
    hidden = SHAPES[target][0]
    memory = b["weights"] * 4 + 3 * tokens * hidden * 4 + max(k * k for k in (hidden, SHAPES[target][1])) * 4 * 2
    return {"blocks": blocks, "forward_passes": passes, "ratio_tokens": ratio_tokens, "ratio_rounding": ratio_round,
            "cpu_block_s": cpu_block, "cpu_model_s": cpu_block * blocks, "gpu_block_s": gpu_block,
            "gpu_model_s": gpu_block * blocks, "memory_mb": memory / 2**20}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    row = measure(args)
    tokens = args.samples * args.seq_len
    print(f"command: python bench/calibration_scaling.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    hidden, mlp, heads, kv, _ = SHAPES[args.shape]
    print(
        f"one synthetic Llama block, hidden {hidden}, MLP {mlp}, {heads}/{kv} heads; {args.levels} {args.bits}-bit "
        f"group {args.group_size}; {args.samples} × {args.seq_len} tokens; {torch.get_num_threads()} threads\n"
    )
    print("| measured (this machine) | value |\n|---|---|")
    print(f"| time per block | {row['seconds']:.1f} s (CPU {row['cpu_seconds']:.1f} s) |")
    print(f"| of which rounding (GPTQ + scale search) | {row['rounding_seconds']:.1f} s |")
    print(f"| one float forward over all samples | {row['forward_seconds']:.2f} s |")
    print(f"| float block + cached activations | {row['float_block_mb']:.0f} MB + {row['activations_mb']:.0f} MB |")
    print(f"| process RSS before → peak | {row['rss_before_mb']:.0f} → {row['rss_peak_mb']:.0f} MiB |")
    print(f"| block output error before → after | {row['before']:.3e} → {row['after']:.3e} |")
    if args.shape != "smoke":
        est = estimate(row, args.shape, "7b", tokens)
        print("\n| ESTIMATE for Llama-2-7B (32 blocks), scaled from this block | value |\n|---|---|")
        print(f"| CPU, this machine's threads (estimate) | {est['cpu_block_s']:.0f} s per block, "
              f"{est['cpu_model_s'] / 60:.0f} min for the model |")  # fmt: skip
        print(f"| one GPU (estimate, not measured: {GPU_FLOPS / 1e12:.0f} TFLOP/s + launch-bound column loop) | "
              f"{est['gpu_block_s']:.1f} s per block, {est['gpu_model_s'] / 60:.1f} min for the model |")  # fmt: skip
        print(f"| working set per block (estimate: float block + 3 activation copies + 2 Hessians) | "
              f"{est['memory_mb']:.0f} MB |")  # fmt: skip
        print(f"\nscaling: forwards+Hessians ×{est['ratio_tokens']:.2f} ({est['forward_passes']:.1f} forward-pass "
              f"equivalents measured), rounding ×{est['ratio_rounding']:.2f}")  # fmt: skip
    return row


if __name__ == "__main__":
    main()
