"""Accuracy benchmark: SmolLM2-135M perplexity on WikiText-2 for float, uniform int RTN, uniform-int error feedback
(GPTQ with the ``int`` level set, same code), HQQ, and single-term ``pot`` / two-term ``sp2`` PoT calibration-free and
calibrated, at 4/3/2 bits and group 64, plus per-layer bit allocation under average bit budgets.

Full run (by hand, ~1 h on 2 idle cores):  python bench/accuracy.py
CI smoke (< 2 min):                       python bench/accuracy.py --smoke
Zero level vs none (docs/levels.md):      python bench/accuracy.py --levels

Perplexity: non-overlapping 512-token windows of ``../shared/data/wikitext-2/test.txt`` (the first ``--windows``);
calibration text: ``valid.txt``. Every row is measured in the same run on the same windows. PoT rows go through
``from_pretrained(..., quantization_config=PoTConfig(...))`` (calibrated rows with ``dataset=``), so their times are
the library's own route: "load" is the whole call (quantise on load + calibration), "calibration" its calibration
part (wall and CPU seconds; the machine may be shared). "bits/weight" counts what the checkpoint stores: packed
codes, float16 scales and offsets.
"""

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_utils import (  # noqa: E402
    PeakRSS,
    calibration_summary,
    quantize_hqq,
    quantize_quanto,
    quantize_uniform,
    stored_bits_per_weight,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
TEST, VALID = os.path.join(DATA, "test.txt"), os.path.join(DATA, "valid.txt")
POT_ROWS = {  # method key -> (levels, calibrated, row name)
    "int-gptq": ("int", True, "uniform int error feedback (GPTQ, int levels)"),
    "pot": ("pot", False, "PoT single-term, calibration-free"),
    "pot-cal": ("pot", True, "PoT single-term, calibrated"),
    "sp2": ("sp2", False, "PoT two-term (sp2), calibration-free"),
    "sp2-cal": ("sp2", True, "PoT two-term (sp2), calibrated"),
}
BASELINES = {"int": ("uniform int RTN", quantize_uniform), "hqq": ("HQQ", quantize_hqq),
             "quanto": ("optimum-quanto", quantize_quanto)}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI (< 2 min on 2 cores)")
    p.add_argument("--levels", action="store_true", help="PoT zero_level True vs False instead of the main table")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--budgets", type=float, nargs="*", default=[3.5], help="average-bit budgets (sp2 calibrated)")
    p.add_argument(
        "--budget-samples",
        type=int,
        default=None,
        help="calibration samples for the budget rows only (default: --samples)",
    )
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="int,int-gptq,hqq,pot,pot-cal,sp2,sp2-cal",
                   help=f"comma-separated rows besides float, of {sorted({**BASELINES, **POT_ROWS})}")  # fmt: skip
    cal = p.add_argument_group("calibration (unset: the PoTConfig defaults)")
    cal.add_argument("--samples", type=int, default=None, help="calibration samples (num_samples)")
    cal.add_argument("--cal-seq-len", type=int, default=None, help="tokens per calibration sample")
    cal.add_argument("--rounding", choices=["gptq", "nearest"], default=None)
    cal.add_argument("--group-scales", choices=["static", "dynamic"], default=None)
    cal.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None)
    cal.add_argument("--act-weighted-init", action=argparse.BooleanOptionalAction, default=None)
    cal.add_argument("--refine-scales", action=argparse.BooleanOptionalAction, default=None, help="PoTPTQ step 2")
    cal.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="step 2 in bf16 autocast")
    cal.add_argument("--damp-percent", type=float, default=None)
    cal.add_argument("--epochs", type=int, default=None)
    cal.add_argument("--lr", type=float, default=None, help="step 2 learning rate")
    p.add_argument("--grid-points", type=int, default=None, help="scale search candidates (default: PoTConfig's)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (smoke)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.levels and args.grid_points is None:
        args.grid_points = 8
    if args.smoke:  # the first 2 of 30 layers: checks the whole pipeline, the numbers mean little
        args.bits, args.budgets, args.windows, args.seq_len, args.layers = [4], [3.5], 2, 128, 2
        args.samples, args.cal_seq_len, args.grid_points = 2, 128, 4
    return args


def calibration_fields(args) -> dict:
    """The calibration fields given on the command line (the others keep PoTConfig's defaults)."""
    names = {"samples": "num_samples", "cal_seq_len": "seq_len", "rounding": "rounding", "epochs": "epochs",
             "group_scales": "group_scales", "act_order": "act_order", "act_weighted_init": "act_weighted_init",
             "refine_scales": "refine_scales", "amp": "amp", "damp_percent": "damp_percent",
             "lr": "learning_rate"}  # fmt: skip
    return {field: getattr(args, a) for a, field in names.items() if getattr(args, a) is not None}


def load(path, args, **kw):
    from transformers import AutoModelForCausalLM

    if args.layers:
        kw["num_hidden_layers"] = args.layers
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def ppl(model, tok, args) -> float:
    """Test perplexity; PoT layers evaluated with ``backend="cpu"`` (fp32 throughout, like the float row), so the
    rows measure the quantisation alone (``auto`` would prefill in bfloat16 on AMX/AVX512-BF16 CPUs: ±0.2 %,
    int8_accuracy.py)."""
    from optimum_pot import set_backend
    from optimum_pot.nn.convert import pot_layers
    from optimum_pot.utils.perplexity import perplexity

    if pot_layers(model):
        set_backend(model, "cpu")
    return perplexity(model, tok, TEST, args.seq_len, max_windows=args.windows, progress=False)


def row_baseline(name, fn, path, tok, bits, args):
    """A baseline quantiser on a fresh float copy; a failure becomes a printed note, not a crash."""
    try:
        model = fn(load(path, args), bits, args.group_size)
        return ppl(model, tok, args), ""
    except Exception as e:  # e.g. a backend without this bit width or without CPU support
        note = f"{name} {bits}-bit failed: {e.__class__.__name__}: {str(e).splitlines()[0][:120]}"
        print("note:", note, flush=True)
        return math.nan, note


def row_pot(path, tok, bits, args, levels, calibrated: bool, zero_level=None, budget=None) -> dict:
    """PoT via ``from_pretrained`` (quantise on load; with a dataset, calibration after loading)."""
    from optimum_pot import PoTConfig

    kw = dict(bits=bits, group_size=args.group_size, levels=levels, zero_level=zero_level)
    if args.grid_points is not None:
        kw["grid_points"] = args.grid_points
    if calibrated:
        kw.update(dataset=VALID, tokenizer=tok, bit_budget=budget, **calibration_fields(args))
        if budget is not None and args.budget_samples is not None:
            kw["num_samples"] = args.budget_samples
    gc.collect()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        model = load(path, args, quantization_config=PoTConfig(**kw))
    out = {"load_s": time.perf_counter() - t0, "mem": mem, "bits": stored_bits_per_weight(model)}
    out.update(calibration_summary(getattr(model, "pot_calibration_report", None)))
    out["ppl"] = ppl(model, tok, args)
    return out


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


HEADER = [
    "| bits | method | perplexity | × float | bits/weight stored | load (s) | calibration wall / CPU (s) | per block "
    "(s) | peak RSS (before → peak) | float block + activations |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def pot_line(label, bits, name, r, base) -> str:
    rss = f"{r['mem'].start / 2**20:.0f} → {r['mem'].peak / 2**20:.0f} MiB"
    cal = work = block = ""
    if "seconds" in r:
        cal = f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f}"
        block = f"{r['block_seconds']:.1f}"
        work = f"{r['float_block_mb']:.0f} + {r['activations_mb']:.0f} MB"
    return (f"| {label} | {name} | {r['ppl']:.2f} | {r['ppl'] / base:.2f} | {r['bits']:.2f} | {r['load_s']:.0f} | "
            f"{cal} | {block} | {rss} | {work} |")  # fmt: skip


def main_table(path, tok, args):
    methods = args.methods.split(",")
    unknown = set(methods) - set(BASELINES) - set(POT_ROWS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {sorted({**BASELINES, **POT_ROWS})}")
    base = ppl(load(path, args), tok, args)
    print(f"float perplexity {base:.2f}", flush=True)
    lines, notes = HEADER + [f"| 32 | float | {base:.2f} | 1.00 | 32 | | | | | |"], []
    for bits in args.bits:
        for key in methods:
            if key in BASELINES:
                name, fn = BASELINES[key]
                value, note = row_baseline(name, fn, path, tok, bits, args)
                notes += [note] if note else []
                lines.append(f"| {bits} | {name} | {fmt(value)} | {fmt(value / base)} | | | | | | |")
            else:
                levels, calibrated, name = POT_ROWS[key]
                lines.append(pot_line(bits, bits, name, row_pot(path, tok, bits, args, levels, calibrated), base))
            print(lines[-1], flush=True)
    for budget in args.budgets if "sp2-cal" in methods else []:
        r = row_pot(path, tok, 4, args, "sp2", True, budget=budget)
        spent = r.get("allocation", {})
        name = f"sp2 calibrated, budget {budget:g} bits ({spent.get('code_bits', math.nan):.2f} code bits spent)"
        if args.budget_samples is not None:
            name += f", {args.budget_samples} samples"
        lines.append(pot_line(f"≤{budget:g}", 4, name, r, base))
        print(lines[-1], flush=True)
    return lines, notes


def levels_table(path, tok, args):
    base = ppl(load(path, args), tok, args)
    head = f"PoT RTN, {args.grid_points}-point scale search; float perplexity {base:.2f}"
    lines = [head, "", "| bits | zero_level=True | zero_level=False |", "|---|---|---|"]
    for bits in args.bits:
        vals = [row_pot(path, tok, bits, args, "pot", False, zero_level=z)["ppl"] for z in (True, False)]
        lines.append(f"| {bits} | {vals[0]:.2f} | {vals[1]:.2f} |")
        print(lines[-1], flush=True)
    return lines, []


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # the truncated smoke model's load report is expected noise
    import optimum_pot  # noqa: F401  (registers "pot")
    from optimum_pot import PoTConfig
    from optimum_pot.utils.models import smollm2_checkpoint

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    lines, notes = (levels_table if args.levels else main_table)(path, tok, args)
    cfg = PoTConfig(**calibration_fields(args))
    print("\ncommand: python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(
        f"windows: {args.windows} x {args.seq_len} tokens of test.txt; group {args.group_size}; calibration "
        f"{cfg.num_samples} x {cfg.seq_len} tokens of valid.txt, rounding {cfg.rounding} (act_order "
        f"{cfg.act_order}, {cfg.group_scales} scales, damp {cfg.damp_percent}), step 2 "
        f"{cfg.refine_scales if cfg.refine_scales is not None else 'default'}; {torch.get_num_threads()} threads\n"
    )
    print("\n".join(lines))
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    main()
