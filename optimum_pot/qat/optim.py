"""An optimizer for QAT with a learning rate of its own for the quantisation parameters (scales and offsets).

Why: Adam moves every parameter by about its learning rate per step, whatever the parameter's size. A group scale of
the two-term level sets is ~1e-3 (their levels are integers up to 80), so the learning rate that suits the weights
(1e-4) moves a scale by ~10 % a step. Measured on SmolLM2-135M, 3-bit, QAT from the calibrated model with the latent
weights frozen, 20 steps at lr 1e-4: scale learning rate 1e-4 → perplexity 25.5, 3e-5 → 21.5, 1e-5 → 22.7
(docs/training.md). The ``Trainer`` has one learning rate and builds its optimizer before any callback could
regroup it, so the groups are built here and handed to it as ``Trainer(optimizers=(optimizer, None))`` (the pattern
of peft's ``create_loraplus_optimizer``); the ``Trainer``'s scheduler then scales every group alike.
"""

import math

import torch
from torch import nn

from .fake_quant import PoTFakeQuantLinear, is_qat_prepared


def _check_lr(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"qat_optimizer: {name} must be a finite number ≥ 0, got {value!r}.")


def qat_param_groups(model: nn.Module, lr: float, scale_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups of a QAT-prepared ``model``: scales/offsets at ``scale_lr`` (no weight decay), the other
    trainable matrices at ``lr`` with ``weight_decay``, the trainable vectors (norms, biases) at ``lr`` without it.

    Raises:
        ValueError: ``model`` is not prepared (``prepare_qat``), has nothing trainable, or a rate is not ≥ 0.
    """
    for name, value in (("lr", lr), ("scale_lr", scale_lr), ("weight_decay", weight_decay)):
        _check_lr(name, value)
    if not is_qat_prepared(model):
        raise ValueError(
            "qat_optimizer needs a model with fake-quantised layers: call optimum_pot.prepare_qat(model, config) "
            "(or with from_quantized=True for a packed model) first, then build the optimizer, then the Trainer."
        )
    quant = {id(p) for m in model.modules() if isinstance(m, PoTFakeQuantLinear)
             for p in (m.weight_scale, m.weight_offset) if p is not None}  # fmt: skip
    groups = {"scales": [], "decay": [], "no_decay": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["scales" if id(p) in quant else "decay" if p.ndim >= 2 else "no_decay"].append(p)
    if not any(groups.values()):
        raise ValueError("qat_optimizer: the model has no trainable parameters (all requires_grad=False).")
    return [
        g
        for g in (
            {"params": groups["scales"], "lr": scale_lr, "weight_decay": 0.0},
            {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay},
            {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0},
        )
        if g["params"]
    ]


SCALE_LR_RATIO = 0.3  # scale_lr / lr when not given: 3e-5 at lr 1e-4, the best measured (module docstring)


def qat_optimizer(
    model: nn.Module, lr: float, scale_lr: float | None = None, weight_decay: float = 0.0, optimizer_cls=None, **kwargs
) -> torch.optim.Optimizer:
    """An optimizer over a QAT-prepared model with the scales/offsets at their own learning rate.

    Args:
        model (`torch.nn.Module`): prepared by :func:`~optimum_pot.prepare_qat` (the ``Trainer`` must get the
            same model).
        lr (`float`): learning rate of everything else (the latent weights, norms, biases); pass the
            ``TrainingArguments.learning_rate`` too, it is what the ``Trainer`` logs.
        scale_lr (`float`, *optional*): learning rate of the scales and offsets; defaults to ``0.3 · lr``.
        weight_decay (`float`, *optional*, defaults to 0.0): for the trainable matrices only.
        optimizer_cls (*optional*, defaults to `torch.optim.AdamW`): the optimizer class.
        kwargs: further arguments of ``optimizer_cls`` (betas, eps, ...).

    Example:

    ```python
    prepare_qat(model, cfg, from_quantized=True, train_weights=False)  # a calibrated packed model
    optimizer = qat_optimizer(model, lr=1e-4)  # scales at 3e-5
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, None),
                      callbacks=[PoTQATCallback(cfg)])
    ```
    """
    _check_lr("lr", lr)
    scale_lr = SCALE_LR_RATIO * lr if scale_lr is None else scale_lr
    cls = torch.optim.AdamW if optimizer_cls is None else optimizer_cls
    return cls(qat_param_groups(model, lr, scale_lr, weight_decay), lr=lr, **kwargs)
