"""``optimum-pot eval MODEL --text-file F``: perplexity over non-overlapping windows, with a progress bar."""

import json
import os

from .common import DTYPES, CLIError, check_text_file, load_tokenizer, resolve_model_arg, text_name


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="perplexity of a (PoT or float) checkpoint on a text",
        description="Perplexity of MODEL over non-overlapping windows of a text (the GPTQ/AWQ WikiText-2 protocol).",
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, Hub id or 'smollm2'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", metavar="F", help="UTF-8 text file, e.g. ../shared/data/wikitext-2/test.txt")
    src.add_argument("--hf-dataset", metavar="NAME", help="datasets name (needs network), e.g. wikitext2")
    p.add_argument("--split", default="test", help="split of --hf-dataset (default: test)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="dtype of the float parts (default: auto)")
    p.add_argument(
        "--record",
        action="store_true",
        help="write the perplexity into MODEL's config.json and model card (local PoT checkpoints)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from transformers import AutoModelForCausalLM

    from ..utils.perplexity import perplexity, token_windows
    from ..utils.text import load_texts

    if args.seq_len < 2 or (args.max_windows is not None and args.max_windows < 1):
        raise CLIError("--seq-len must be >= 2 and --max-windows >= 1.")
    if args.text_file:
        source, name = check_text_file(args.text_file, "--text-file"), text_name(args.text_file)
    else:
        source, name = load_texts(args.hf_dataset, split=args.split), f"{args.hf_dataset} {args.split}"
    path = resolve_model_arg(args.model)
    if args.record and not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError("--record needs MODEL to be a local checkpoint folder.")
    tokenizer = load_tokenizer(path, required_for="eval")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
    ppl = perplexity(model, tokenizer, source, args.seq_len, args.max_windows, args.batch_size)
    print(f"perplexity of {args.model} on {name} (seq_len={args.seq_len}): {ppl:.3f}")
    if args.record:
        windows = len(token_windows(tokenizer, source, args.seq_len, args.max_windows))
        _record(model, path, ppl, name, args.seq_len, windows)
    return 0


def _record(model, path: str, ppl: float, name: str, seq_len: int, windows: int) -> None:
    """Adds the perplexity to config.json's quantization_config and rewrites the PoT model card."""
    from ..hf.model_card import pot_config_of, record_eval, write_card

    if pot_config_of(model) is None:
        raise CLIError(f"--record needs a PoT checkpoint; {path} has no PoT quantization_config.")
    record_eval(model, ppl, name, seq_len, windows)
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = pot_config_of(model).to_dict()
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    write_card(path, pot_config_of(model))
    print(f"recorded in {config_path} and {os.path.join(path, 'README.md')}")
