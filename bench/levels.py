"""Which level sets: weight SQNR and model quality of candidate level tables, calibration-free, side by side.

Every 2-D linear weight (not ``lm_head``) is fake-quantised with the library's own search (``search_scales``:
coarse-to-fine shrink search + least-squares refinement) and nearest-level encode, then the model is evaluated:
perplexity on WikiText-2 test windows for the causal LMs, sentence-embedding error against the float model for
MiniLM (the one float-origin checkpoint; see bench_models.py). Results: docs/levels.md.

    python bench/levels.py                       # all models, bits 4 3 2 (~40 min on 2 cores)
    python bench/levels.py --models smollm2 --bits 4 --windows 2 --smoke
"""

import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import gemma3_checkpoint, minilm_checkpoint  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")
NF4 = (
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
)  # fmt: skip  (bitsandbytes' NF4: the not-multiply-free reference)

# Candidate tables besides the registered families: name -> {bits: values}. Integers (the scale absorbs the unit),
# each a sum of at most two signed powers of two and at most 128 in magnitude (the int8 CPU path).
CANDIDATES = {
    "sp2-fit": {  # Lloyd-Max on float-origin weights (MiniLM, Gemma-3), projected on two-term integers
        4: (-80, -62, -48, -36, -28, -18, -10, -3, 5, 12, 20, 28, 36, 48, 62, 80),
        3: (-56, -36, -20, -6, 7, 20, 36, 56),
        2: (-30, -9, 9, 30),
    },
    "sp2-sym": {  # the same shapes, made symmetric
        4: (-80, -62, -48, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 48, 62, 80),
        3: (-56, -36, -20, -6, 6, 20, 36, 56),
        2: (-10, -3, 3, 10),
    },
    "sp2-zero": {  # symmetric with an exact zero (the 16th code repeats the largest level's sign pattern)
        4: (-80, -62, -48, -36, -28, -18, -10, -4, 0, 4, 10, 18, 28, 36, 48, 62),
        3: (-48, -24, -10, 0, 10, 24, 48, 64),
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma3", "minilm"])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--grid-points", type=int, default=16)
    p.add_argument("--refine-steps", type=int, default=2)
    p.add_argument("--alpha-min", type=float, default=0.5)
    p.add_argument("--free-offset", action="store_true", help="offsets need not put a level on zero")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--smoke", action="store_true", help="2 windows, 2 layers, 4 bits: checks the pipeline")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def level_sets(bits: int):
    """``(row name, level set)`` candidates at ``bits``: registered families with and without offsets, tables."""
    from optimum_pot.format.level_set import LevelSet
    from optimum_pot.format.registry import get_level_set

    rows = []
    for family in ("pot", "int", "sp2"):
        for offset in (False, True):
            rows.append((f"{family}{'+offset' if offset else ''}", get_level_set(family, bits, offset=offset)))
    for name, tables in CANDIDATES.items():
        if bits in tables:
            for offset in (False, True):
                ls = LevelSet(name, bits, tuple(float(v) for v in tables[bits]), offset=offset)
                rows.append((f"{name}{'+offset' if offset else ''}", ls))
    if bits == 4:  # NF4, duck-typed: not a LevelSet (its levels are no sums of powers of two)
        lv = tuple(sorted(NF4))
        nf4 = SimpleNamespace(levels=lv, midpoints=tuple((a + b) / 2 for a, b in zip(lv, lv[1:])), offset=False,
                              max_abs=1.0, id="nf4")  # fmt: skip
        rows.append(("nf4 (reference, not multiply-free)", nf4))
    return rows


def baseline_rows(bits: int):
    """Peers' calibration-free quantisers at the same bits and groups: uniform asymmetric RTN and HQQ."""
    return [("uniform RTN (peer baseline)", "rtn"), ("HQQ (peer baseline)", "hqq")]


def fake_quantize_baseline(model, kind, bits, args) -> float:
    """Uniform RTN (bench/accuracy_utils.py) or HQQ's own quantiser, weights replaced in place; returns SQNR."""
    from accuracy_utils import uniform_fake_quant

    sig = err = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = m.weight.data.float()
        if kind == "rtn":
            q = uniform_fake_quant(w, bits, args.group_size)
        else:
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            cfg = BaseQuantizeConfig(nbits=bits, group_size=args.group_size)
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data = w.clone()
            q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu").dequantize().float()
        sig, err = sig + w.pow(2).sum().item(), err + (w - q).pow(2).sum().item()
        m.weight.data = q.to(m.weight.dtype)
    return 10 * math.log10(sig / err)


def fake_quantize_model(model, ls, args) -> float:
    """Replaces every linear weight (not lm_head) by its quantised value; returns the overall weight SQNR (dB)."""
    from optimum_pot.format.groups import expand_groups
    from optimum_pot.format.levels import nearest_levels, unit_ratio
    from optimum_pot.format.scale_search import search_scales

    sig = err = 0.0
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        w = m.weight.data.float()
        s, z = search_scales(w, ls, args.group_size, args.grid_points, refine_steps=args.refine_steps,
                             alpha_min=args.alpha_min, exact_zero=not args.free_offset)  # fmt: skip
        sf = expand_groups(s, args.group_size, w.shape[1])
        zf = None if z is None else expand_groups(z, args.group_size, w.shape[1])
        q = nearest_levels(unit_ratio(w, sf, zf), ls) * sf + (0 if zf is None else zf)
        sig, err = sig + w.pow(2).sum().item(), err + (w - q).pow(2).sum().item()
        m.weight.data = q.to(m.weight.dtype)
    return 10 * math.log10(sig / err)


def load(model_name: str, args):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from optimum_pot.utils.models import smollm2_checkpoint

    path = {"smollm2": smollm2_checkpoint, "gemma3": gemma3_checkpoint, "minilm": minilm_checkpoint}[model_name]()
    kw = {"num_hidden_layers": 2} if args.smoke else {}
    cls = AutoModel if model_name == "minilm" else AutoModelForCausalLM
    return lambda: cls.from_pretrained(path, dtype=torch.float32, **kw).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embeddings(model, tok, sentences):
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def quality(model_name, model, tok, args, reference=None):
    """Perplexity (causal LMs) or ``(1 − cos)·1000`` against the float embeddings (MiniLM)."""
    if model_name != "minilm":
        from optimum_pot.utils.perplexity import perplexity

        return perplexity(model, tok, TEST, 512, max_windows=args.windows, progress=False), None
    with open(TEST, encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line.strip()) > 40][: 32 * args.windows]
    emb = embeddings(model, tok, lines)
    if reference is None:
        return 0.0, emb
    return (1 - (emb * reference).sum(-1)).mean().item() * 1000, emb


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        args.models, args.bits, args.windows = args.models[:1], [4], 2
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    import optimum_pot.format.families  # noqa: F401  (registers the families)

    wanted = set(args.rows.split(",")) if args.rows else None
    lines = []
    for model_name in args.models:
        make, tok = load(model_name, args)
        base, ref = quality(model_name, make(), tok, args)
        metric = "perplexity" if model_name != "minilm" else "embedding error (1−cos)·1000"
        lines += [f"\n### {model_name}: {metric}, float {base:.3f}", "", "| bits | level set | weight SQNR (dB) | "
                  f"{metric} | quantise s |", "|---|---|---|---|---|"]  # fmt: skip
        print(lines[-4], flush=True)
        for bits in args.bits:
            for row, ls in baseline_rows(bits) + level_sets(bits):
                if wanted and row.split(" ")[0] not in wanted:
                    continue
                model = make()
                t0 = time.perf_counter()
                if isinstance(ls, str):
                    sqnr = fake_quantize_baseline(model, ls, bits, args)
                else:
                    sqnr = fake_quantize_model(model, ls, args)
                secs = time.perf_counter() - t0
                value, _ = quality(model_name, model, tok, args, ref)
                lines.append(f"| {bits} | {row} | {sqnr:.2f} | {value:.3f} | {secs:.0f} |")
                print(lines[-1], flush=True)
    print(f"\ncommand: python bench/levels.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"group {args.group_size}, {args.grid_points}-point search + {args.refine_steps} least-squares steps, "
          f"{args.windows} windows x 512 tokens of wikitext-2 test ({32 * args.windows} lines for MiniLM)")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
