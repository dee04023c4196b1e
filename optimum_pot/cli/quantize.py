"""``optimum-pot quantize MODEL OUTPUT``: quantise a float checkpoint while loading it, then save it packed."""

import argparse
import json
import os
import time

from ..format import families as _families  # noqa: F401  (registers the built-in level sets)
from ..format.registry import families
from ..library.ops import BACKENDS
from .common import (
    DTYPES,
    CLIError,
    check_text_file,
    format_bytes,
    load_tokenizer,
    resolve_model_arg,
    text_name,
    weights_size,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="quantise a float checkpoint to PoT and save it",
        description="Quantise MODEL (a checkpoint folder, a Hub id or 'smollm2') while loading it and save the packed "
        "PoT checkpoint (and tokenizer) to OUTPUT.",
    )
    p.add_argument("model", metavar="MODEL", help="float checkpoint: folder, Hub id, or 'smollm2' (offline SmolLM2)")
    p.add_argument("output", metavar="OUTPUT", help="folder to write the PoT checkpoint to (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into OUTPUT even if it is a non-empty folder")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4], help="bits per weight (default: 4)")
    p.add_argument("--group-size", type=int, help="input columns per scale (default: PoTConfig's, 64)")
    p.add_argument("--levels", default=None, choices=families(), help="level-set family (default: sp2)")
    p.add_argument(
        "--zero-level",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pot only: the all-ones exponent code means 0 (default: on)",
    )
    p.add_argument(
        "--offset",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store a per-group offset (default: the level set's measured default)",
    )
    p.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="NAME", help="modules kept in float")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="forward kernel, saved in config.json")
    p.add_argument("--grid-points", type=int, help="scale-search candidates per group (default: the level set's)")
    p.add_argument("--refine-steps", type=int, help="least-squares refinement rounds (default: the level set's)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="dtype of the float parts (default: auto)")
    calib = p.add_argument_group("calibration (error-feedback rounding + PoTPTQ step 2; optional)")
    calib.add_argument("--dataset", metavar="FILE_OR_NAME", help="calibration text file or datasets name")
    calib.add_argument("--num-samples", type=int, help="calibration sequences (default: PoTConfig's, 16)")
    calib.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default: 512)")
    calib.add_argument("--epochs", type=int, help="passes over the calibration set (default: 2)")
    calib.add_argument(
        "--rounding",
        choices=["gptq", "nearest"],
        help="codes by error-feedback rounding (gptq) or the nearest level (default: gptq)",
    )
    calib.add_argument("--damp-percent", type=float, help="gptq: Hessian damping (default: 0.01)")
    calib.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        help="gptq: round columns by decreasing input energy (default: on)",
    )
    calib.add_argument(
        "--group-scales",
        choices=["static", "dynamic"],
        help="gptq: scales searched before rounding, or as each group is reached (default: static)",
    )
    calib.add_argument(
        "--refine-scales",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="learn the scale residual (PoTPTQ step 2, --epochs passes) after rounding (default: on)",
    )
    calib.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="step 2 in bfloat16 autocast (default: where bfloat16 is fast: CUDA, CPUs with AMX or AVX512-BF16)",
    )
    calib.add_argument(
        "--bit-budget",
        type=float,
        default=None,
        metavar="BITS",
        help="average code bits per weight; each layer's bits (2/3/4) chosen from its measured sensitivity",
    )
    ev = p.add_argument_group("evaluation (optional; the perplexity goes into config.json and the model card)")
    ev.add_argument("--eval-text", metavar="FILE", help="text file to measure the quantised perplexity on")
    ev.add_argument("--eval-windows", type=int, default=None, metavar="N", help="evaluate only the first N windows")
    ev.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default: 512)")
    p.set_defaults(func=run)


def build_config(args, tokenizer):
    """The `PoTConfig` of the command line (raises `ValueError` for invalid values)."""
    from ..config import PoTConfig

    # Options left unset (None) fall through to PoTConfig's defaults, so the CLI and from_pretrained quantise alike.
    unset_is_default = ("group_size", "num_samples", "seq_len", "epochs", "rounding", "damp_percent", "act_order",
                        "group_scales")  # fmt: skip
    chosen = {k: getattr(args, k) for k in unset_is_default if getattr(args, k) is not None}
    return PoTConfig(
        bits=args.bits,
        **chosen,
        levels=args.levels,
        zero_level=args.zero_level,
        offset=args.offset,
        modules_to_not_convert=args.modules_to_not_convert,
        backend=args.backend,
        grid_points=args.grid_points,
        refine_steps=args.refine_steps,
        dataset=args.dataset,
        tokenizer=tokenizer if args.dataset else None,
        refine_scales=args.refine_scales,
        amp=args.amp,
        bit_budget=args.bit_budget,
    )


def check_output(output: str, overwrite: bool) -> None:
    """Raises `CLIError` when OUTPUT is a file, or a non-empty folder and ``overwrite`` is off."""
    if os.path.isfile(output):
        raise CLIError(f"OUTPUT {output} is a file; pass a folder to write the checkpoint to.")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise CLIError(
            f"OUTPUT {output} already exists and is not empty; pass --overwrite to write the checkpoint into it, "
            "or choose a new folder."
        )


def check_float_source(path: str, name: str) -> None:
    """Raises `CLIError` when MODEL is already quantised: from_pretrained would keep its saved quantization_config
    and silently ignore the command line's settings."""
    from transformers import AutoConfig

    quant = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    if quant is None:
        return
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method == "pot":
        raise CLIError(
            f"MODEL {name} is already a PoT checkpoint (levels {quant.get('levels')}, {quant.get('bits')}-bit, group "
            f"size {quant.get('group_size')}); quantise its original float checkpoint instead (re-quantising decoded "
            "PoT weights would round them twice). To inspect it: optimum-pot info MODEL."
        )
    raise CLIError(f"MODEL {name} is already quantised ({method}); pass a float checkpoint.")


def describe(quant: dict) -> str:
    """One line of the settings that were written (from the saved config.json's quantization_config)."""
    from ..config import PoTConfig

    config = PoTConfig.from_dict(quant)
    return (
        f"PoT {config.level_set.id} ({config.bits}-bit), group size {config.group_size}, backend {config.backend}, "
        f"format version {quant.get('format_version')}"
    )


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    from ..hf.model_card import record_eval
    from ..utils.perplexity import perplexity, token_windows

    check_output(args.output, args.overwrite)
    if args.eval_text:
        check_text_file(args.eval_text, "--eval-text")
    if args.dataset and os.path.sep in args.dataset:
        check_text_file(args.dataset, "--dataset")
    path = resolve_model_arg(args.model)
    check_float_source(path, args.model)
    needs = "--dataset" if args.dataset else "--eval-text" if args.eval_text else None
    tokenizer = load_tokenizer(path, required_for=needs)
    config = build_config(args, tokenizer)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=DTYPES[args.dtype])
    print(f"quantised {args.model} to PoT in {time.perf_counter() - start:.1f} s")
    if args.eval_text:
        ppl = perplexity(model, tokenizer, args.eval_text, args.eval_seq_len, max_windows=args.eval_windows)
        windows = len(token_windows(tokenizer, args.eval_text, args.eval_seq_len, args.eval_windows))
        record_eval(model, ppl, text_name(args.eval_text), args.eval_seq_len, windows)
        print(f"perplexity on {text_name(args.eval_text)}: {ppl:.3f}")
    model.save_pretrained(args.output)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output)
    with open(os.path.join(args.output, "config.json"), encoding="utf-8") as f:
        written = json.load(f)["quantization_config"]
    print(
        f"saved to {args.output}: {describe(written)}; weights {format_bytes(weights_size(args.output))} "
        f"(float checkpoint: {format_bytes(weights_size(path))})"
    )
    return 0
