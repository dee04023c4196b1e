"""Calibration data: text (strings, a ``datasets.Dataset``, a dataset name or a file) → token samples ``[S, L]``."""

from typing import Any

import torch

from ..utils.text import load_texts


def resolve_tokenizer(tokenizer: Any):
    """Returns a tokenizer object; loads one when given a name or path. Raises when there is none."""
    if tokenizer is None:
        raise ValueError(
            "PoT calibration needs a tokenizer to turn the calibration dataset into tokens: pass "
            "PoTConfig(..., dataset=..., tokenizer=AutoTokenizer.from_pretrained(model_id)) (or the tokenizer's "
            "name/path)."
        )
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def calibration_samples(dataset: Any, tokenizer: Any, num_samples: int, seq_len: int) -> torch.Tensor:
    """Tokenises ``dataset`` and cuts it into up to ``num_samples`` windows of ``seq_len`` tokens: ``[S, L]``.

    The texts are joined by blank lines (as in the GPTQ/AWQ recipes, so short documents still fill a window) and the
    windows are spread evenly over the whole corpus, which keeps the result deterministic.

    Args:
        dataset: list of strings, ``datasets.Dataset`` with a ``text`` column, dataset name or text file path.
        tokenizer: tokenizer object, name or path.
        num_samples (`int`): windows wanted.

    Raises:
        ValueError: no tokenizer, no text, or text too short for ``num_samples`` windows of ``seq_len`` tokens.
        seq_len (`int`): tokens per window.
    """
    tokenizer = resolve_tokenizer(tokenizer)
    texts = [t for t in load_texts(dataset) if t and t.strip()]
    if not texts:
        raise ValueError(
            "The PoT calibration dataset is empty (no non-blank text); pass a list of strings, a text file or a "
            "datasets.Dataset with a non-empty 'text' column."
        )
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    total = ids.numel() // seq_len
    if total == 0:
        raise ValueError(
            f"The calibration text has {ids.numel()} tokens, shorter than one sample of seq_len={seq_len} tokens; "
            "pass more (or longer) text, or lower PoTConfig(seq_len=...)."
        )
    if total < num_samples:
        raise ValueError(
            f"The calibration text has {ids.numel()} tokens: only {total} samples of seq_len={seq_len} tokens, fewer "
            f"than num_samples={num_samples}. Pass more text, or lower PoTConfig(num_samples={total}) or seq_len."
        )
    windows = ids[: total * seq_len].reshape(total, seq_len)  # [W, L]
    pick = torch.linspace(0, total - 1, min(num_samples, total)).round().long().unique()
    return windows[pick]  # [S, L]
