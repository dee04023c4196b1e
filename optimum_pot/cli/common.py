"""Helpers shared by the CLI subcommands: user errors, model/text arguments, sizes on disk."""

import glob
import os
import re

import torch

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A mistake in the command line: printed as one message, exit code 2, no traceback."""


def resolve_model_arg(name_or_path: str) -> str:
    """``"smollm2"``, a local checkpoint folder or a Hub id; anything else is a `CLIError` naming the fix."""
    from ..utils.models import SMOLLM2, resolve_model

    if name_or_path.lower() == SMOLLM2:
        try:
            return resolve_model(name_or_path)
        except ImportError as e:
            raise CLIError(str(e)) from e
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"{name_or_path} has no config.json; pass a transformers checkpoint folder.")
        return path
    if os.path.exists(path) or not _HUB_ID.match(name_or_path):
        raise CLIError(
            f"Model {name_or_path} is neither a checkpoint folder nor a Hub id; pass a folder with config.json, "
            "a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or 'smollm2'."
        )
    return name_or_path  # a Hub id: from_pretrained downloads it (or says why it cannot)


def check_text_file(path: str, option: str) -> str:
    """Raises `CLIError` unless ``path`` is a readable file."""
    if not os.path.isfile(path):
        raise CLIError(
            f"{option} {path}: no such file; pass a UTF-8 text file (e.g. ../shared/data/wikitext-2/test.txt)."
        )
    return path


def text_name(path: str) -> str:
    """A short name of a text file for reports and model cards: its folder and file name."""
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])


def load_tokenizer(model_path: str, required_for: str | None = None):
    """The checkpoint's tokenizer, or `None` when it has none (an error when ``required_for`` says why it is needed)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as e:
        if required_for:
            raise CLIError(f"{model_path} has no usable tokenizer, needed for {required_for} ({e}).") from e
        return None


def weights_size(path: str) -> int | None:
    """Bytes of the ``*.safetensors`` files of a local checkpoint folder (`None` for a Hub id)."""
    if not os.path.isdir(path):
        return None
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))


def format_bytes(n: int | None) -> str:
    """``123.4 MB`` (decimal units, like the Hub), or ``unknown``."""
    if n is None:
        return "unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.1f} GB"
