"""Accuracy benchmark: SmolLM2-135M perplexity on WikiText-2 for float, uniform int RTN, HQQ, optimum-quanto,
PoT round-to-nearest and PoT calibrated (PoTPTQ step 2), at 4/3/2 bits and group 64.

Full run (by hand, ~35 min on 2 cores):  python bench/accuracy.py
CI smoke (< 2 min):                     python bench/accuracy.py --smoke
Zero level vs none (docs/levels.md):     python bench/accuracy.py --levels

Perplexity: non-overlapping 512-token windows of ``../shared/data/wikitext-2/test.txt`` (the first ``--windows``);
calibration text: ``valid.txt``. Every row is measured in the same run on the same windows.
"""

import argparse
import gc
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_utils import PeakRSS, quantize_hqq, quantize_quanto, quantize_uniform  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2")
TEST, VALID = os.path.join(DATA, "test.txt"), os.path.join(DATA, "valid.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI (< 2 min on 2 cores)")
    p.add_argument("--levels", action="store_true", help="PoT zero_level True vs False instead of the main table")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--samples", type=int, default=32, help="calibration samples")
    p.add_argument("--cal-seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--reg-lambda", type=float, default=1e-4)
    p.add_argument("--no-act-weighted-init", action="store_true")
    p.add_argument("--methods", default="int,hqq,quanto,pot,pot-cal", help="comma-separated rows besides float")
    p.add_argument(
        "--grid-points", type=int, default=None, help="step-1 scale grid (default 32; 8 with --levels or --smoke)"
    )
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (smoke)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.grid_points is None:
        args.grid_points = 8 if args.levels or args.smoke else 32
    if args.smoke:  # the first 2 of 30 layers: checks the whole pipeline, the numbers mean little
        args.bits, args.windows, args.seq_len, args.layers = [4], 2, 128, 2
        args.samples, args.cal_seq_len, args.epochs = 2, 128, 1
    return args


def load(path, args, **kw):
    from transformers import AutoModelForCausalLM

    if args.layers:
        kw["num_hidden_layers"] = args.layers
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def ppl(model, tok, args) -> float:
    from optimum_pot.utils.perplexity import perplexity

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


def row_pot(path, tok, bits, args, calibrated: bool, zero_level: bool = True):
    """PoT via ``from_pretrained`` (quantise on load; with a dataset, PoTPTQ step 2 after loading)."""
    from optimum_pot import PoTConfig

    kw = dict(bits=bits, group_size=args.group_size, zero_level=zero_level, grid_points=args.grid_points)
    if calibrated:
        kw.update(
            dataset=VALID,
            tokenizer=tok,
            num_samples=args.samples,
            seq_len=args.cal_seq_len,
            epochs=args.epochs,
            learning_rate=args.lr,
            reg_lambda=args.reg_lambda,
            act_weighted_init=not args.no_act_weighted_init,
        )
    gc.collect()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        model = load(path, args, quantization_config=PoTConfig(**kw))
    seconds = time.perf_counter() - t0
    return ppl(model, tok, args), seconds, mem


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def main_table(path, tok, args):
    methods = args.methods.split(",")
    base = ppl(load(path, args), tok, args)
    print(f"float perplexity {base:.2f}", flush=True)
    lines = [
        "| bits | method | perplexity | × float | calibration time | peak RSS (before → peak) |",
        "|---|---|---|---|---|---|",
    ]
    lines.append(f"| 32 | float | {base:.2f} | 1.00 | | |")
    notes = []
    baselines = {
        "int": ("uniform int RTN", quantize_uniform),
        "hqq": ("HQQ", quantize_hqq),
        "quanto": ("optimum-quanto", quantize_quanto),
    }
    for bits in args.bits:
        for key in methods:
            if key in baselines:
                name, fn = baselines[key]
                value, note = row_baseline(name, fn, path, tok, bits, args)
                notes += [note] if note else []
                lines.append(f"| {bits} | {name} | {fmt(value)} | {fmt(value / base)} | | |")
            elif key in ("pot", "pot-cal"):
                value, secs, mem = row_pot(path, tok, bits, args, calibrated=key == "pot-cal")
                name = "PoT calibrated (PoTPTQ 1+2)" if key == "pot-cal" else "PoT RTN (searched scale)"
                timing = f"{secs:.0f} s" if key == "pot-cal" else ""
                rss = f"{mem.start / 2**20:.0f} → {mem.peak / 2**20:.0f} MiB"
                lines.append(f"| {bits} | {name} | {value:.2f} | {value / base:.2f} | {timing} | {rss} |")
            print(lines[-1], flush=True)
    return lines, notes


def levels_table(path, tok, args):
    base = ppl(load(path, args), tok, args)
    head = f"PoT RTN, {args.grid_points}-point scale search; float perplexity {base:.2f}"
    lines = [head, "", "| bits | zero_level=True | zero_level=False |", "|---|---|---|"]
    for bits in args.bits:
        vals = [row_pot(path, tok, bits, args, calibrated=False, zero_level=z)[0] for z in (True, False)]
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
    from optimum_pot.utils.models import smollm2_checkpoint

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    lines, notes = (levels_table if args.levels else main_table)(path, tok, args)
    print("\ncommand: python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(
        f"windows: {args.windows} x {args.seq_len} tokens of test.txt; group {args.group_size}; calibration "
        f"{args.samples} x {args.cal_seq_len} tokens of valid.txt, {args.epochs} epochs, lr {args.lr}, "
        f"λ {args.reg_lambda}; {torch.get_num_threads()} threads\n"
    )
    print("\n".join(lines))
    for n in notes:
        print(f"\nnote: {n}")


if __name__ == "__main__":
    main()
