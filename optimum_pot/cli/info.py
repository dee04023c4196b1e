"""``optimum-pot info MODEL``: a checkpoint's PoT configuration and sizes, read without loading the model."""

import glob
import json
import os

from .common import CLIError, format_bytes, resolve_model_arg, weights_size


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="print a local checkpoint's PoT configuration and size",
        description="Print the quantization_config, packed layers and size on disk of a local checkpoint folder.",
    )
    p.add_argument("model", metavar="MODEL", help="local checkpoint folder (or 'smollm2')")
    p.add_argument("--verify", action="store_true",
                   help="check each packed layer against the digests written at save (exit 1 on mismatch)")  # fmt: skip
    p.set_defaults(func=run)


def tensor_summary(path: str) -> dict:
    """Counts of packed layers, their weights and bytes, from the safetensors headers only."""
    from safetensors import safe_open

    layers, packed_bytes, other_bytes = 0, 0, 0
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                size = numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
                if name.endswith(".weight_scale"):
                    layers += 1
                if name.endswith(".weight_scale") or (sl.get_dtype() == "U8" and name.endswith(".weight")):
                    packed_bytes += size
                else:
                    other_bytes += size
    return {"pot_layers": layers, "packed_bytes": packed_bytes, "other_bytes": other_bytes}


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I32": 4, "I64": 8, "BOOL": 1}


def run(args) -> int:
    path = resolve_model_arg(args.model)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CLIError(f"info reads local checkpoint folders; {args.model} is not one (download it first).")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    quant = config.get("quantization_config")
    print(f"model: {args.model} ({', '.join(config.get('architectures') or ['?'])})")
    if not quant or quant.get("quant_method") != "pot":
        method = quant.get("quant_method") if quant else "none (float)"
        print(f"quantization: {method}")
    else:
        print("quantization: pot")
        for key in ("levels", "bits", "group_size", "zero_level", "offset", "format_version",
                    "modules_to_not_convert", "module_bits"):  # fmt: skip
            print(f"  {key}: {quant.get(key)}")
        if quant.get("eval_perplexity") is not None:
            print(f"  perplexity: {quant['eval_perplexity']:.3f} on {quant.get('eval_text')}")
    summary = tensor_summary(path)
    print(
        f"PoT layers: {summary['pot_layers']}; packed codes + scales {format_bytes(summary['packed_bytes'])}, "
        f"other tensors {format_bytes(summary['other_bytes'])}"
    )
    print(f"weights on disk: {format_bytes(weights_size(path))}")
    return verify(path) if args.verify else 0


def verify(path: str) -> int:
    """``--verify``: 0 when every digest matches, 1 (naming the layers) when one does not."""
    import time

    from ..hf.checkpoint import verify_files

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    start = time.perf_counter()
    try:
        checked, bad = verify_files(files)
    except ValueError as err:
        raise CLIError(str(err)) from err
    seconds = time.perf_counter() - start
    if bad:
        names = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        print(f"integrity: FAILED for {len(bad)} of {checked} layers ({names}): the packed tensors changed since "
              "they were saved; re-download the checkpoint.")  # fmt: skip
        return 1
    print(f"integrity: {checked} layers match their SHA-256 digests ({seconds:.2f} s)")
    return 0
