"""Helpers of ``bench/qat.py``: token datasets, a Trainer run of QAT, perplexity of a token tensor, a char GPT."""

import math
import tempfile
import time
from dataclasses import dataclass

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
    """exp(mean next-token NLL) over ``[W, T]`` windows; PoT layers computed with ``backend="cpu"`` (fp32, like the
    float rows; ``auto`` would prefill in bfloat16 on AMX/AVX512-BF16 CPUs), their backends restored afterwards."""
    from optimum_pot.nn import PoTLinear

    model.eval()
    pot = [m for m in model.modules() if isinstance(m, PoTLinear)]
    backends = [m.backend for m in pot]
    for m in pot:
        m.backend = "cpu"
    nll, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            logits = model(batch).logits.float()
            nll += nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    finally:
        for m, b in zip(pot, backends, strict=True):
            m.backend = b
    return math.exp(nll / count)


@dataclass
class Clock:
    """Wall and CPU seconds (all threads of this process) of a ``with`` block; ``+`` adds two clocks.

    The machine may be shared: CPU seconds do not grow with other processes' load the way wall seconds do, and
    on an idle machine wall ≈ CPU / threads for these well-parallelised loops.
    """

    wall: float = 0.0
    cpu: float = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c

    def __add__(self, other: "Clock") -> "Clock":
        return Clock(self.wall + other.wall, self.cpu + other.cpu)


def train(model, windows, steps: int, lr: float, batch_size: int, callbacks=(), seed=0, optimizer=None):
    """Runs ``steps`` optimizer steps of the ``Trainer`` on ``windows``; returns a :class:`Clock` (set-up included).

    Constant learning rate after a short warm-up: short QAT runs lose most of their gain to a decaying schedule.
    Every run (float reference, QAT, LoRA) uses this same schedule, data order and batch size. ``optimizer``: one
    built outside (``qat_optimizer``'s two learning rates), else the ``Trainer``'s AdamW at ``lr``.
    """
    from transformers import Trainer, TrainingArguments

    clock = Clock()
    clock.__enter__()  # the callback's prepare_qat (scale search) runs in Trainer(): count it
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps // 10), weight_decay=0.0,
            logging_steps=max(1, steps // 5), save_strategy="no", report_to=[], use_cpu=True, seed=seed,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=WindowDataset(windows), callbacks=list(callbacks),
                          optimizers=(optimizer, None))  # fmt: skip
        model.train()
        trainer.train()
    clock.__exit__()
    model.eval()
    return clock


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
    """Fraction of the PTQ→float perplexity gap that QAT closes (1 = float quality, 0 = no better than PTQ).

    ``ppl_float`` must be the float model trained with the same data, steps and schedule as the QAT/LoRA run:
    training on in-domain text lowers the float model's perplexity too, and comparing against the untrained float
    model would credit QAT with that domain gain.
    """
    gap = ppl_ptq - ppl_float
    return (ppl_ptq - ppl_qat) / gap if gap > 0 else float("nan")


LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def lora_train(model: nn.Module, windows: torch.Tensor, steps: int, lr: float, batch_size: int, r: int = 16):
    """LoRA (r, alpha = 2r, all projections) on a packed PoT model with the Trainer; returns ``(peft_model, Clock)``."""
    from peft import LoraConfig, get_peft_model

    targets = LORA_TARGETS["gpt2" if model.config.model_type == "gpt2" else "llama"]
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets))
    return peft_model, train(peft_model, windows, steps, lr, batch_size)


def mean_merge_error(model: nn.Module) -> float:
    """Mean over merged layers of ``optimum_pot.peft.merge_errors``."""
    from optimum_pot.peft import merge_errors

    errors = list(merge_errors(model).values())
    return sum(errors) / max(len(errors), 1)
