"""QAT benchmark: PTQ (calibration-free, calibrated) vs QAT with the Trainer (``PoTQATCallback``) vs LoRA on the
packed PTQ model (adapters, and merged back onto the PoT grid).

1. SmolLM2-135M-Instruct: training text ``../shared/data/wikitext-2/valid.txt``, perplexity on the first
   ``--windows`` 512-token windows of ``test.txt``.
2. A small char-level GPT-2 (4 layers x 128, 0.8M parameters; nanoGPT's shakespeare_char is 6 x 384) on
   ``../shared/data/tinyshakespeare/input.txt`` (the PoT-QAT paper's first setting): float training here, then PTQ
   vs QAT vs LoRA; perplexity per character on the last 10 % of the text.

Reports steps, wall time (set-up such as the scale search included) and the fraction of the PTQ→float perplexity
gap closed. Every row of a table is measured in the same run; the 2 cores are shared, so wall times are indicative.

Full run (by hand):  python bench/qat.py      (sections: --skip-char / --skip-smollm2; --bits 3 4)
CI smoke (< 2 min):  python bench/qat.py --smoke
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qat_utils import (  # noqa: E402
    CharTokenizer,
    char_gpt,
    gap_closed,
    lora_train_and_merge,
    train,
    window_perplexity,
    windows_of,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
VALID, TEST = (os.path.join(SHARED, "wikitext-2", f) for f in ("valid.txt", "test.txt"))
SHAKESPEARE = os.path.join(SHARED, "tinyshakespeare", "input.txt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI (< 2 min on 2 cores)")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--windows", type=int, default=8, help="SmolLM2 test windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=60, help="SmolLM2 QAT optimizer steps (0: skip QAT)")
    p.add_argument("--train-seq-len", type=int, default=256, help="SmolLM2 QAT tokens per sample")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4, help="SmolLM2 QAT learning rate (weights and scales)")
    p.add_argument("--cal-samples", type=int, default=16, help="calibrated PTQ samples (0: skip)")
    p.add_argument("--lora-steps", type=int, default=40, help="SmolLM2 LoRA steps on the packed PTQ model (0: skip)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--char-float-steps", type=int, default=2000)
    p.add_argument("--char-qat-steps", type=int, default=100, help="char model QAT (and LoRA) steps")
    p.add_argument("--char-batch-size", type=int, default=16)
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-char", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.bits, args.windows, args.seq_len, args.steps, args.train_seq_len = [3], 1, 128, 2, 64
        args.cal_samples, args.char_float_steps, args.char_qat_steps, args.lora_steps = 0, 20, 5, 0
    return args


def row(model, bits, method, ppl, ppl_float, ppl_ptq=None, steps="", wall=None):
    gap = "" if ppl_ptq is None else f"{100 * gap_closed(ppl_float, ppl_ptq, ppl):.0f}%"
    wall_s = "" if wall is None else f"{wall:.0f}"
    print(f"| {model} | {bits} | {method} | {ppl:.2f} | {steps} | {wall_s} | {gap} |", flush=True)


def header(title):
    print(f"\n{title}\n\n| model | bits | method | perplexity | steps | wall s | PTQ gap closed |", flush=True)
    print("|---|---|---|---|---|---|---|", flush=True)


def lora_rows(name, ptq, windows, args, steps, lr, ppl_float, ppl_ptq, evaluate, batch_size=None, r=16):
    """LoRA on the packed PTQ model, then merged back onto the PoT grid: two rows."""
    peft_model, wall, merge = lora_train_and_merge(ptq, windows, steps, lr, batch_size or args.batch_size, r)
    bits = ptq.config.quantization_config.bits
    row(name, bits, f"PTQ + LoRA r={r} (float adapters)", evaluate(peft_model), ppl_float, ppl_ptq, steps, wall)
    merged, err = merge()
    row(name, bits, f"PTQ + LoRA merged (mean merge error {err:.3f})", evaluate(merged), ppl_float, ppl_ptq, steps)


def run_smollm2(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, PoTQATCallback, convert_qat, prepare_qat, quantize
    from optimum_pot.utils.models import smollm2_checkpoint
    from optimum_pot.utils.perplexity import token_windows

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    test = token_windows(tok, TEST, args.seq_len, args.windows)
    train_windows = windows_of(tok(open(VALID, encoding="utf-8").read(), return_tensors="pt").input_ids[0],
                               args.train_seq_len)  # fmt: skip
    grid = 1 if args.smoke else 32
    header(f"SmolLM2-135M, group {args.group_size}, WikiText-2 test {args.windows}x{args.seq_len} tokens")
    ppl_float = window_perplexity(load(), test)
    row("SmolLM2-135M", "16", "float", ppl_float, ppl_float)
    for bits in args.bits:
        cfg = PoTConfig(bits=bits, group_size=args.group_size, grid_points=grid)
        # The step-1 scale search is the costly part of both PTQ and QAT set-up: run it once. Converting the
        # untrained QAT model *is* calibration-free PTQ (bit-exact, tests/test_qat.py).
        t0 = time.perf_counter()
        qat_model = prepare_qat(load(), cfg)
        search_wall = time.perf_counter() - t0
        ptq = convert_qat(copy.deepcopy(qat_model), cfg)
        ppl_ptq = window_perplexity(ptq, test)
        row("SmolLM2-135M", bits, "PTQ calibration-free", ppl_ptq, ppl_float, wall=search_wall)
        if args.lora_steps:
            lora_rows("SmolLM2-135M", ptq, train_windows, args, args.lora_steps, args.lora_lr, ppl_float, ppl_ptq,
                      lambda m: window_perplexity(m, test))  # fmt: skip
        del ptq
        if args.cal_samples:
            cal = PoTConfig(bits=bits, group_size=args.group_size, tokenizer=tok, num_samples=args.cal_samples,
                            seq_len=args.train_seq_len, epochs=1)  # fmt: skip
            t0 = time.perf_counter()
            model = quantize(load(), cal, dataset=VALID)
            wall = time.perf_counter() - t0
            row("SmolLM2-135M", bits, f"PTQ calibrated ({args.cal_samples} samples)", window_perplexity(model, test),
                ppl_float, ppl_ptq, wall=wall)  # fmt: skip
            del model
        if not args.steps:
            continue
        qat_model.get_input_embeddings().weight.requires_grad_(False)  # tied with lm_head (kept float): frozen
        wall = search_wall + train(qat_model, train_windows, args.steps, args.lr, args.batch_size,
                                   [PoTQATCallback(cfg)])  # fmt: skip
        ppl_qat = window_perplexity(qat_model, test)
        row("SmolLM2-135M", bits, "QAT", ppl_qat, ppl_float, ppl_ptq, args.steps, wall)
        del qat_model


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
    model = char_gpt(len(tok.chars), **size).eval()
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    header(f"char-level GPT-2 ({size}, {n_params:.2f}M params), tinyshakespeare, last 10% ({val.numel()} chars)")
    wall = train(model, train_windows, args.char_float_steps, 2e-3, args.char_batch_size)
    ppl_float = window_perplexity(model, val)
    row("char GPT", "32", "float (trained here)", ppl_float, ppl_float, steps=args.char_float_steps, wall=wall)
    # QAT and LoRA train N more steps: a small model that is still improving would credit them with the extra
    # training, so the gap is measured against the float model trained the same N more steps.
    ref = copy.deepcopy(model)
    wall = train(ref, train_windows, args.char_qat_steps, 5e-4, args.char_batch_size)
    ppl_ref = window_perplexity(ref, val)
    row("char GPT", "32", f"float + {args.char_qat_steps} steps (gap reference)", ppl_ref, ppl_ref,
        steps=args.char_qat_steps, wall=wall)  # fmt: skip
    ppl_float = ppl_ref
    group = 32
    for bits in args.bits:
        cfg = PoTConfig(bits=bits, group_size=group)
        ptq = quantize(copy.deepcopy(model), cfg)
        ppl_ptq = window_perplexity(ptq, val)
        row("char GPT", bits, f"PTQ calibration-free (g{group})", ppl_ptq, ppl_float)
        lora_rows("char GPT", ptq, train_windows, args, args.char_qat_steps, 2e-3, ppl_float, ppl_ptq,
                  lambda m: window_perplexity(m, val), batch_size=args.char_batch_size, r=8)  # fmt: skip
        qat = copy.deepcopy(model)
        wall = train(qat, train_windows, args.char_qat_steps, 5e-4, args.char_batch_size, [PoTQATCallback(cfg)])
        row("char GPT", bits, f"QAT (g{group})", window_perplexity(qat, val), ppl_float, ppl_ptq,
            args.char_qat_steps, wall)  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    t0 = time.perf_counter()
    if not args.skip_char:
        run_char(args)
    if not args.skip_smollm2:
        run_smollm2(args)
    print(f"\ntotal wall: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
