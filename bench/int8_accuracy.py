"""What ``backend="cpu_int8"`` (and ``"auto"``, which takes it for decode) costs in accuracy: decode-path perplexity of
SmolLM2-135M, PoT ``cpu`` vs ``cpu_int8``, for each level-set family.

Perplexity over the first ``--tokens`` tokens of ``../shared/data/wikitext-2/test.txt``, fed one token at a time
through the KV cache, so every matmul takes the decode path (M = 1) where ``cpu_int8`` rounds activations to int8
(a whole-sequence forward would take the exact GEMM path and show no difference). Each family at its default options
(``sp2``: two-term levels with per-group offsets, the default; ``pot``: single-term), default scales (32-point grid
search), group 64, ``lm_head`` float (the default); the same packed model is evaluated with both backends.

    python bench/int8_accuracy.py                  # sp2 and pot, 3 and 4 bits, 512 tokens (~10 min on 2 cores)
    python bench/int8_accuracy.py --smoke          # CI: sp2 4-bit, closed-form scales, no refinement, 16 tokens
    python bench/int8_accuracy.py --head           # the int8 lm_head serving copy vs the float head (~3 min)
    python bench/int8_accuracy.py --prefill        # whole-window perplexity: bfloat16 prefill GEMM vs fp32 (~3 min)

``--head`` measures ``PoTConfig(lm_head="int8")`` / ``optimum_pot.int8_lm_head``: the same decode-path perplexity
with the float ``lm_head`` and with its int8 per-row copy, on the float model and on the default 4-bit PoT model
(``PoTConfig()``, backend ``auto``).

``--prefill`` measures the other half of ``cpu_int8``/``auto``: on CPUs with AMX or AVX512-BF16 their prefill GEMM
(more than ``GEMM_MIN_M`` rows) runs in bfloat16. Perplexity over 512-token windows, each one forward (every matmul
takes the GEMM path), backend ``cpu`` vs ``cpu_int8``, same packed model.
"""

import argparse
import copy
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=None, help="default: 3 4 (smoke: 4)")
    parser.add_argument("--levels", nargs="+", default=None, help="level-set families (default: sp2 pot; smoke: sp2)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head", action="store_true", help="int8 lm_head vs float head instead of the backends")
    parser.add_argument("--prefill", action="store_true", help="bfloat16 vs fp32 prefill GEMM (whole windows)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from cpu_e2e import stepwise_perplexity  # bench/ is on sys.path when run as a script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, quantize, set_backend
    from optimum_pot.format.registry import get_level_set
    from optimum_pot.kernels.cpu import int8_path
    from optimum_pot.utils.models import smollm2_checkpoint

    t0 = time.perf_counter()
    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    n_tokens = 16 if args.smoke else args.tokens
    bits_list = args.bits or ([4] if args.smoke else [3, 4])
    families = args.levels or (["sp2"] if args.smoke else ["sp2", "pot"])
    ids = tok(open(WIKITEXT, encoding="utf-8").read()[:20000], return_tensors="pt").input_ids[:, :n_tokens]
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if args.prefill:
        return prefill_rows(float_model, tok, families, bits_list, args, t0)
    print(f"## Decode-path perplexity, SmolLM2-135M, first {n_tokens} tokens of wikitext-2 test, one token a forward")
    if args.head:
        return head_rows(float_model, ids, t0)
    print(f"float32: {stepwise_perplexity(float_model, ids):.3f}\n")
    print("| level set | group | int8 path | cpu (fp32 activations) | cpu_int8 (int8 activations) | relative change |")
    print("|---|---|---|---|---|---|")
    for levels in families:
        for bits in bits_list:
            ls = get_level_set(levels, bits)
            search = dict(grid_points=1, refine_steps=0) if args.smoke else dict(grid_points=32)
            model = quantize(copy.deepcopy(float_model), PoTConfig(bits=bits, group_size=64, levels=levels, **search))
            exact = stepwise_perplexity(set_backend(model, "cpu"), ids)
            int8 = stepwise_perplexity(set_backend(model, "cpu_int8"), ids)
            runs = "yes" if int8_path(1, 64, ls) else "no (fp32)"
            print(
                f"| {ls.id} | 64 | {runs} | {exact:.3f} | {int8:.3f} | {100 * (int8 / exact - 1):+.2f} % |", flush=True
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def prefill_rows(float_model, tok, families, bits_list, args, t0):
    """Whole-window perplexity (the prefill path) with ``cpu`` (fp32 GEMM) and ``cpu_int8`` (bfloat16 GEMM on
    AMX/AVX512-BF16 CPUs)."""
    from optimum_pot import PoTConfig, quantize, set_backend
    from optimum_pot.kernels.cpu import bf16_path
    from optimum_pot.utils.perplexity import perplexity

    windows, seq_len = (1, 128) if args.smoke else (8, 512)
    print(f"\n## Prefill-path perplexity: {windows} x {seq_len}-token windows of wikitext-2 test, one forward each; "
          f"bfloat16 GEMM on this CPU: {'yes' if bf16_path(seq_len) else 'no (both rows fp32)'}\n")  # fmt: skip
    print("| level set | group | cpu (fp32 GEMM) | cpu_int8 / auto (bf16 GEMM) | relative change |")
    print("|---|---|---|---|---|")
    for levels in families:
        for bits in bits_list:
            search = dict(grid_points=1, refine_steps=0) if args.smoke else {}
            model = quantize(copy.deepcopy(float_model), PoTConfig(bits=bits, group_size=64, levels=levels, **search))
            ppl = {b: perplexity(set_backend(model, b), tok, WIKITEXT, seq_len, max_windows=windows, progress=False)
                   for b in ("cpu", "cpu_int8")}  # fmt: skip
            change = 100 * (ppl["cpu_int8"] / ppl["cpu"] - 1)
            ls_id = model.config.quantization_config.level_set.id
            print(f"| {ls_id} | 64 | {ppl['cpu']:.3f} | {ppl['cpu_int8']:.3f} | {change:+.2f} % |", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


def head_rows(float_model, ids, t0):
    """Decode-path perplexity with the float lm_head and with its int8 serving copy (same weights)."""
    from cpu_e2e import stepwise_perplexity

    from optimum_pot import PoTConfig, int8_lm_head, quantize

    print("| model | float lm_head | int8 lm_head | relative change |\n|---|---|---|---|")
    pot = quantize(copy.deepcopy(float_model), PoTConfig())
    for name, model in (("float32", float_model), ("PoT default (PoTConfig(), sp2:4:offset, g64, auto)", pot)):
        ref = stepwise_perplexity(model, ids)
        fast = stepwise_perplexity(int8_lm_head(model), ids)
        print(f"| {name} | {ref:.3f} | {fast:.3f} | {100 * (fast / ref - 1):+.2f} % |", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
