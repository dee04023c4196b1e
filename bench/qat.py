"""QAT benchmark: every QAT / LoRA row next to the float model trained with the same data, steps and schedule.

1. SmolLM2-135M: training text ``../shared/data/wikitext-2/valid.txt`` (256-token samples), perplexity on the first
   ``--windows`` 512-token windows of ``test.txt``. Rows: the float model untouched; the **reference**: the float
   model trained ``--steps`` steps exactly like the QAT runs (same batches, schedule, frozen embeddings); per bit
   width: calibration-free PTQ (the QAT starting point), optionally calibrated PTQ, then the ``--methods``:
   ``qat`` (next-token loss), ``qat-cal`` (the same, starting from the calibrated PTQ model of ``--cal-samples``:
   ``prepare_qat(model, cfg, from_quantized=True)``), ``kd`` (distilling the reference, i.e. the float model
   fine-tuned on the same text),
   ``kd-base`` (distilling the untouched float model), ``ft-cal`` (no QAT: the reference, then calibrated PTQ),
   ``ft-kd`` (``ft-cal``, then ``--steps`` steps of QAT of its scales and norms distilling the reference: no new
   data is fitted, the packed model learns to imitate its own float model), ``lora`` (adapters on the packed PTQ
   model; merged with plain nearest rounding; merged with ``merge_and_requantize``, error feedback on
   ``--merge-samples`` windows).
2. A small char-level GPT-2 (4 layers x 128) on ``../shared/data/tinyshakespeare/input.txt``: float training here,
   then PTQ vs QAT vs LoRA, against the float model trained the same extra steps.

Columns: ``× ref`` = perplexity / reference perplexity (the issue's targets: 4-bit ≤ 1.05, 3-bit ≤ 1.15, 2-bit ≤
1.6); ``gap closed`` = (PTQ − method) / (PTQ − reference); ``wall s`` / ``CPU s`` (all threads of this process) of
the row's own work (set-up such as the scale search included; a ``kd`` row's teacher is the reference row, whose
training cost is on that row). Every row of a table is measured in the same run.

Full run (by hand):  python bench/qat.py --skip-char      (see --help; one heavy run at a time on 2 cores)
CI smoke (< 2 min):  python bench/qat.py --smoke
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_utils import (  # noqa: E402
    CharTokenizer,
    Clock,
    char_gpt,
    gap_closed,
    lora_train,
    mean_merge_error,
    train,
    window_perplexity,
    windows_of,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
VALID, TEST = (os.path.join(SHARED, "wikitext-2", f) for f in ("valid.txt", "test.txt"))
SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare", "input.txt")
METHODS = ("qat", "qat-cal", "kd", "kd-base", "lora", "lora-cal", "ft-cal", "ft-kd", "qp-cal")
# methods that start from (or end with) calibrated PTQ
CALIBRATED = {"qat-cal", "lora-cal", "ft-cal", "ft-kd", "qp-cal"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI (< 2 min on 2 cores)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="SmolLM2 test windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--methods", default="kd,qat,lora", help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--steps", type=int, default=60, help="SmolLM2 training steps of every row (reference too)")
    p.add_argument("--train-seq-len", type=int, default=256, help="SmolLM2 training tokens per sample")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4, help="SmolLM2 learning rate (reference, QAT weights and scales)")
    p.add_argument("--alpha", type=float, default=1.0, help="kd: weight of the KL (1 - alpha: next-token loss)")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="kd: weight of the per-block hidden loss")
    p.add_argument("--cal-samples", type=int, default=0, help="calibrated (GPTQ) PTQ row with this many samples")
    p.add_argument("--cal-seq-len", type=int, default=512, help="tokens per calibration sample (library default)")
    p.add_argument("--freeze-scales", action="store_true", help="QAT rows train the weights only (scales fixed)")
    p.add_argument("--scale-lr", type=float, default=None, help="qp-cal: scales' learning rate (default 0.3 lr)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--merge-samples", type=int, default=16, help="merge_and_requantize windows (0: skip the row)")
    p.add_argument("--char-float-steps", type=int, default=2000)
    p.add_argument("--char-qat-steps", type=int, default=100, help="char model QAT (and LoRA) steps")
    p.add_argument("--char-batch-size", type=int, default=16)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-char", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.bits, args.windows, args.seq_len, args.steps, args.train_seq_len = [3], 1, 128, 2, 64
        args.cal_samples, args.char_float_steps, args.char_qat_steps, args.merge_samples = 0, 20, 5, 2
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    if args.smoke and set(args.methods) & CALIBRATED:
        args.cal_samples, args.cal_seq_len = 2, 64
    if set(args.methods) & CALIBRATED and not args.cal_samples:
        p.error(f"--methods {sorted(set(args.methods) & CALIBRATED)} need --cal-samples N (the calibrated model)")
    return args


def row(model, bits, method, ppl, ppl_ref, ppl_ptq=None, steps="", clock=None):
    gap = "" if ppl_ptq is None else f"{100 * gap_closed(ppl_ref, ppl_ptq, ppl):.0f}%"
    times = "| |" if clock is None else f"| {clock.wall:.0f} | {clock.cpu:.0f} |"
    print(f"| {model} | {bits} | {method} | {ppl:.2f} | {ppl / ppl_ref:.3f} | {steps} {times} {gap} |", flush=True)


def header(title):
    print(f"\n{title}\n\n| model | bits | method | perplexity | × ref | steps | wall s | CPU s | gap closed |",
          flush=True)  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|", flush=True)


def lora_rows(name, ptq, windows, args, steps, lr, ref, ptq_ppl, evaluate, batch_size, r, merge_data=None, base="PTQ"):
    """LoRA on the packed PTQ model (``base`` names it): adapters; merged by nearest rounding; with error feedback."""
    from optimum_pot.peft import merge_and_requantize

    bits = ptq.config.quantization_config.bits
    peft_model, clock = lora_train(ptq, windows, steps, lr, batch_size, r)
    ppl_adapters = evaluate(peft_model)
    row(name, bits, f"{base} + LoRA r={r} (float adapters)", ppl_adapters, ref, ptq_ppl, steps, clock)
    nearest = copy.deepcopy(peft_model)
    with Clock() as clock:
        merged = nearest.merge_and_unload()
    ppl = evaluate(merged)
    row(name, bits, f"LoRA merged, nearest (weight error {mean_merge_error(merged):.4f}; "
        f"{ppl / ppl_adapters:.2f}× adapters)", ppl, ref, ptq_ppl, steps, clock)  # fmt: skip
    del nearest, merged
    if merge_data is None:
        return
    tokenizer, texts = merge_data
    with Clock() as clock:
        merged = merge_and_requantize(peft_model, texts, tokenizer, num_samples=args.merge_samples,
                                      seq_len=args.train_seq_len, progress=False)  # fmt: skip
    ppl = evaluate(merged)
    label = (f"LoRA merged, error feedback on {args.merge_samples} windows (weight error "
             f"{mean_merge_error(merged):.4f}; {ppl / ppl_adapters:.2f}× adapters)")  # fmt: skip
    row(name, bits, label, ppl, ref, ptq_ppl, steps, clock)


def qat_row(label, qat_model, cfg, train_windows, args, ref, ppl_ptq, search, evaluate, **distill):
    """One QAT run from (a copy of) the prepared model; the scale search's time is added to the row."""
    from optimum_pot import PoTQATCallback

    model = copy.deepcopy(qat_model)
    if args.freeze_scales:
        for name, p in model.named_parameters():
            if name.endswith(("weight_scale", "weight_offset")):
                p.requires_grad_(False)
    clock = search + train(model, train_windows, args.steps, args.lr, args.batch_size,
                           [PoTQATCallback(cfg, **distill)])  # fmt: skip
    row("SmolLM2-135M", cfg.bits, label, evaluate(model), ref, ppl_ptq, args.steps, clock)


def qp_row(calibrated, cfg, train_windows, args, ref, ppl_cal, cal_clock, evaluate, start="the calibrated model",
           steps=None, **distill):  # fmt: skip
    """QAT of the quantisation parameters (EfficientQAT's E2E-QP) from a calibrated model, two learning rates;
    ``distill``: ``PoTQATCallback``'s teacher arguments."""
    from optimum_pot import PoTQATCallback, prepare_qat, qat_optimizer

    qcfg = calibrated.config.quantization_config
    model = prepare_qat(copy.deepcopy(calibrated), qcfg, from_quantized=True, train_weights=False)
    optimizer = qat_optimizer(model, lr=args.lr, scale_lr=args.scale_lr)
    clock = cal_clock + train(model, train_windows, args.steps, args.lr, args.batch_size,
                              [PoTQATCallback(qcfg, **distill)], optimizer=optimizer)  # fmt: skip
    scale_lr = optimizer.param_groups[0]["lr"]
    how = "distilling the reference" if distill else "next-token loss"
    label = f"QAT of scales + norms from {start} ({how}, scale lr {scale_lr:g}, weights frozen)"
    row("SmolLM2-135M", cfg.bits, label, evaluate(model), ref, ppl_cal, steps or args.steps, clock)


def run_smollm2(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, convert_qat, prepare_qat, quantize
    from optimum_pot.utils.models import smollm2_checkpoint
    from optimum_pot.utils.perplexity import token_windows

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)

    def load(frozen_embeddings=True):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        # Tied with lm_head (kept float): frozen in every trained row, so all rows train the same parameters.
        model.get_input_embeddings().weight.requires_grad_(not frozen_embeddings)
        return model

    test = token_windows(tok, TEST, args.seq_len, args.windows)
    evaluate = lambda m: window_perplexity(m, test)  # noqa: E731
    valid_text = open(VALID, encoding="utf-8").read()
    train_windows = windows_of(tok(valid_text, return_tensors="pt").input_ids[0], args.train_seq_len)
    grid = 1 if args.smoke else None  # None: the library default (closed form for sp2 with offsets)
    header(f"SmolLM2-135M, group {args.group_size}, WikiText-2 test {args.windows}x{args.seq_len} tokens; "
           f"training: {args.steps} steps x {args.batch_size}x{args.train_seq_len} tokens of valid.txt, "
           f"lr {args.lr}")  # fmt: skip
    ppl_float = evaluate(load())
    row("SmolLM2-135M", "16", "float, untouched", ppl_float, ppl_float)
    reference = load()
    ref_clock = train(reference, train_windows, args.steps, args.lr, args.batch_size)
    ref = evaluate(reference)
    row(
        "SmolLM2-135M", "16", f"**float + {args.steps} steps (reference)**", ref, ref, steps=args.steps, clock=ref_clock
    )
    for bits in args.bits:
        cfg = PoTConfig(bits=bits, group_size=args.group_size, grid_points=grid)
        with Clock() as search:  # converting the untrained QAT model *is* calibration-free PTQ (tests/test_qat.py)
            qat_model = prepare_qat(load(), cfg)
        ptq = convert_qat(copy.deepcopy(qat_model), cfg)
        ppl_ptq = evaluate(ptq)
        row("SmolLM2-135M", bits, f"PTQ calibration-free ({cfg.level_set.id})", ppl_ptq, ref, clock=search)
        if args.cal_samples:
            cal = PoTConfig(bits=bits, group_size=args.group_size, tokenizer=tok, num_samples=args.cal_samples,
                            seq_len=args.cal_seq_len)  # fmt: skip
            with Clock() as cal_clock:
                calibrated = quantize(load(), cal, dataset=VALID)
            ppl_cal = evaluate(calibrated)
            label = f"PTQ calibrated ({args.cal_samples} × {args.cal_seq_len} tokens, {cal.rounding})"
            row("SmolLM2-135M", bits, label, ppl_cal, ref, ppl_ptq, clock=cal_clock)
        ft = None  # the reference calibrated (ft-cal, ft-kd)
        for method in args.methods:
            if method == "qat":
                qat_row("QAT, next-token loss", qat_model, cfg, train_windows, args, ref, ppl_ptq, search, evaluate)
            elif method == "qat-cal":
                cfg_cal = calibrated.config.quantization_config
                start = prepare_qat(copy.deepcopy(calibrated), cfg_cal, from_quantized=True)
                qat_row("QAT from the calibrated PTQ model", start, cfg, train_windows, args, ref, ppl_cal, cal_clock,
                        evaluate)  # fmt: skip
            elif method == "qp-cal":  # the calibrated model's scales, offsets and norms; latent weights frozen
                qp_row(calibrated, cfg, train_windows, args, ref, ppl_cal, cal_clock, evaluate)
            elif method in ("ft-cal", "ft-kd"):  # the float model trained the same steps, then calibrated PTQ
                if ft is None:
                    with Clock() as ft_clock:
                        ft = quantize(copy.deepcopy(reference), cal, dataset=VALID)
                    ppl_ft = evaluate(ft)
                if method == "ft-cal":
                    row("SmolLM2-135M", bits, "float + training steps (the reference), then calibrated PTQ",
                        ppl_ft, ref, ppl_cal, args.steps, ref_clock + ft_clock)  # fmt: skip
                else:  # then the packed model's scales learn to imitate the reference: no new data fitted
                    qp_row(ft, cfg, train_windows, args, ref, ppl_ft, ref_clock + ft_clock, evaluate,
                           "the fine-tuned-then-calibrated model", f"{args.steps} + {args.steps}", teacher=reference,
                           distill_alpha=1.0)  # fmt: skip
            elif method in ("kd", "kd-base"):
                teacher = reference if method == "kd" else load()
                label = "QAT, distilling the reference" if method == "kd" else "QAT, distilling the untouched float"
                qat_row(label, qat_model, cfg, train_windows, args, ref, ppl_ptq, search, evaluate, teacher=teacher,
                        distill_alpha=args.alpha, hidden_weight=args.hidden_weight)  # fmt: skip
            else:  # lora: on the calibration-free model; lora-cal: on the calibrated one (the QLoRA recipe)
                base, base_ppl, label = ((calibrated, ppl_cal, "calibrated PTQ") if method == "lora-cal"
                                         else (ptq, ppl_ptq, "PTQ"))  # fmt: skip
                merge_data = (tok, [valid_text]) if args.merge_samples else None
                lora_rows("SmolLM2-135M", copy.deepcopy(base), train_windows, args, args.steps, args.lora_lr, ref,
                          base_ppl, evaluate, args.batch_size, 16, merge_data, label)  # fmt: skip
        del qat_model, ptq, ft


def run_char(args):
    from optimum_pot import PoTConfig, PoTQATCallback, quantize

    text = open(SHAKESPEARE, encoding="utf-8").read()
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    split = int(0.9 * ids.numel())
    size = dict(n_layer=4, n_embd=128, n_head=4, block=64)
    if args.smoke:
        size = dict(n_layer=2, n_embd=64, n_head=4, block=32)
    block = size["block"]
    train_windows = windows_of(ids[:split], block)
    val = windows_of(ids[split:], block, 16 if args.smoke else 128)
    evaluate = lambda m: window_perplexity(m, val)  # noqa: E731
    model = char_gpt(len(tok.chars), **size).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    header(f"char-level GPT-2 ({size}, {n_params:.2f}M params), tinyshakespeare, last 10% ({val.numel()} chars)")
    clock = train(model, train_windows, args.char_float_steps, 2e-3, args.char_batch_size)
    ppl_float = evaluate(model)
    row("char GPT", "32", "float (trained here)", ppl_float, ppl_float, steps=args.char_float_steps, clock=clock)
    # QAT and LoRA train N more steps: the gap is measured against the float model trained the same N more steps.
    reference = copy.deepcopy(model)
    steps = args.char_qat_steps
    clock = train(reference, train_windows, steps, 5e-4, args.char_batch_size)
    ref = evaluate(reference)
    row("char GPT", "32", f"**float + {steps} steps (reference)**", ref, ref, steps=steps, clock=clock)
    group = 32
    for bits in args.bits:
        cfg = PoTConfig(bits=bits, group_size=group)
        ptq = quantize(copy.deepcopy(model), cfg)
        ppl_ptq = evaluate(ptq)
        row("char GPT", bits, f"PTQ calibration-free (g{group}, {cfg.level_set.id})", ppl_ptq, ref)
        lora_rows("char GPT", ptq, train_windows, args, steps, 2e-3, ref, ppl_ptq, evaluate, args.char_batch_size, 8)
        for label, distill in (("QAT, next-token loss", {}), ("QAT, distilling the reference", {"teacher": reference})):
            qat = copy.deepcopy(model)
            clock = train(qat, train_windows, steps, 5e-4, args.char_batch_size, [PoTQATCallback(cfg, **distill)])
            row("char GPT", bits, f"{label} (g{group})", evaluate(qat), ref, ppl_ptq, steps, clock)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    with Clock() as total:
        if not args.skip_char:
            run_char(args)
        if not args.skip_smollm2:
            run_smollm2(args)
    print(f"\ntotal: {total.wall:.0f} s wall, {total.cpu:.0f} s CPU", flush=True)


if __name__ == "__main__":
    main()
