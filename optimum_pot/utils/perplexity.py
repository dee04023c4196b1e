"""Perplexity over non-overlapping token windows (the WikiText-2 protocol of GPTQ/AWQ papers)."""

import math

import torch
from tqdm.auto import tqdm

from .text import load_texts


def token_windows(tokenizer, source, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenises ``source`` (joined by blank lines) and cuts it into ``[W, seq_len]`` windows."""
    text = "\n\n".join(load_texts(source))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}.")
    return ids[: n * seq_len].reshape(n, seq_len)  # [W, seq_len]


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    source,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) of ``model`` over windows of ``source``.

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: its tokenizer.
        source: text file path, list of strings or ``datasets.Dataset`` (see ``load_texts``).
        seq_len (`int`): tokens per window.
        max_windows (`int`, *optional*): evaluate only the first windows (fast, reproducible comparisons).
        batch_size (`int`): windows per forward pass.
        progress (`bool`): show a progress bar.
    """
    windows = token_windows(tokenizer, source, seq_len, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    bar = tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress)
    for i in bar:
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
        bar.set_postfix(ppl=f"{math.exp(nll / count):.2f}")
    return math.exp(nll / count)
