"""Helpers of ``bench/qat.py``: token datasets, a Trainer run of QAT, perplexity of a token tensor, a char GPT."""

import math
import tempfile
import time

import torch
from torch import nn


class WindowDataset(torch.utils.data.Dataset):
    """Causal-LM examples from ``[W, T]`` token windows (labels = inputs: the model shifts them)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        ids = self.windows[i]
        return {"input_ids": ids, "labels": ids.clone()}


def windows_of(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cuts a 1-D token tensor into non-overlapping ``[W, seq_len]`` windows."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)  # [W, seq_len]


@torch.no_grad()
def window_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over ``[W, T]`` windows."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        logits = model(batch).logits.float()
        nll += nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def train(model: nn.Module, windows: torch.Tensor, steps: int, lr: float, batch_size: int, callbacks=(), seed=0):
    """Runs ``steps`` optimizer steps of the ``Trainer`` on ``windows``; returns wall seconds (set-up included).

    Constant learning rate after a short warm-up: short QAT runs lose most of their gain to a decaying schedule.
    """
    from transformers import Trainer, TrainingArguments

    t0 = time.perf_counter()  # the callback's prepare_qat (scale search) runs in Trainer(): count it
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps // 10), weight_decay=0.0,
            logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=WindowDataset(windows), callbacks=list(callbacks))
        model.train()
        trainer.train()
        wall = time.perf_counter() - t0
    model.eval()
    return wall


class CharTokenizer:
    """Character vocabulary of a text (the nanoGPT shakespeare_char setting)."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)


def char_gpt(vocab_size: int, n_layer: int, n_embd: int, n_head: int, block: int, seed: int = 0):
    """A small GPT-2 (transformers ``Conv1D`` layers) for char-level modelling."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def gap_closed(ppl_float: float, ppl_ptq: float, ppl_qat: float) -> float:
    """Fraction of the PTQ→float perplexity gap that QAT closes (1 = float quality, 0 = no better than PTQ)."""
    gap = ppl_ptq - ppl_float
    return (ppl_ptq - ppl_qat) / gap if gap > 0 else float("nan")


LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_train_and_merge(model: nn.Module, windows: torch.Tensor, steps: int, lr: float, batch_size: int, r: int = 16):
    """LoRA on a packed PoT model with the Trainer, then ``merge_and_unload``.

    Returns ``(peft_model, wall seconds, merged model factory)``: call the factory after evaluating the adapter
    model (merging changes the base in place), it returns ``(merged model, mean relative merge error)``.
    """
    from peft import LoraConfig, get_peft_model

    from optimum_pot.peft import merge_errors

    targets = LORA_TARGETS["gpt2" if model.config.model_type == "gpt2" else "llama"]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    wall = train(peft_model, windows, steps, lr, batch_size)

    def merge():
        merged = peft_model.merge_and_unload()
        errors = list(merge_errors(merged).values())
        return merged, sum(errors) / len(errors)

    return peft_model, wall, merge
