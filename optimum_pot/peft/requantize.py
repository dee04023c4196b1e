"""``merge_and_requantize``: merge LoRA adapters into a packed PoT model without losing what they learned.

A plain ``merge_and_unload()`` rounds ``W + ΔW`` to the nearest level of each group. ``ΔW`` is far smaller than the
spacing of 2-4-bit levels, so almost every weight rounds back to its old code and the adapters' gain is lost (3-bit
SmolLM2: adapters 37.1 → merged 126.9 perplexity before this). Here the merged weight is re-quantised with the
calibration machinery instead: ``W + ΔW`` becomes the float target of every merged layer, every other packed layer
keeps its own (already on-grid) weight as target, and ``optimum_pot.calibration.calibrate`` rounds block by block
with error feedback (GPTQ) on a little text, on the base's own scale grid. The rounding error of each weight is
pushed onto the weights not yet rounded, so the low-rank update survives as a pattern of code changes whose effect
on the layer's outputs matches ``x·ΔWᵀ``. Then PoTPTQ step 2 (the learned scale residual, as in calibration) fits
each block's scales to the merged float block's outputs: on SmolLM2 3-bit (LoRA r=16, 20 steps, 16 windows of 256
tokens) the merged model went from 1.11x the adapters' perplexity (GPTQ alone, 72 s) to 1.025x (130 s)
(BENCHMARKS.md, "QAT"). ``refine_scales=False`` skips it.
"""

import copy

import torch
from torch import nn

from ..nn.pot_linear import PoTLinear


def _quantization_config(model: nn.Module):
    from ..config import PoTConfig

    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(cfg, dict):
        cfg = PoTConfig.from_dict(cfg)
    if not isinstance(cfg, PoTConfig):
        raise ValueError(
            "merge_and_requantize needs a PoT model (loaded with quantization_config=PoTConfig(...) or made by "
            "optimum_pot.quantize) under the adapters; this model has no PoT quantization_config."
        )
    return cfg


@torch.no_grad()
def _merged_targets(peft_model: nn.Module) -> dict[int, torch.Tensor]:
    """``{id(base PoTLinear): float32 W + Σ scaling·B@A}`` of every PoT layer carrying active, unmerged adapters."""
    from .lora import PoTLoraLinear

    targets = {}
    for m in peft_model.modules():
        if isinstance(m, PoTLoraLinear) and not m.merged:
            adapters = [a for a in m.active_adapters if a in m.lora_A]
            if adapters:
                base = m.get_base_layer()
                w = base.dequantize_weight(torch.float32)  # [N, K]
                targets[id(base)] = w + sum(m.get_delta_weight(a).float() for a in adapters)
    return targets


def merge_and_requantize(
    peft_model: nn.Module,
    dataset,
    tokenizer=None,
    num_samples: int = 32,
    seq_len: int = 512,
    progress: bool = True,
    **calibration_fields,
) -> nn.Module:
    """Merges the adapters of a LoRA ``PeftModel`` on a packed PoT base and re-quantises with error feedback.

    Args:
        peft_model (`PeftModel`): LoRA adapters (``get_peft_model``) on a packed PoT model.
        dataset: calibration text (list of strings, ``datasets.Dataset``, dataset name or file path), e.g. a slice
            of the fine-tuning text; 32 windows of 512 tokens are plenty.
        tokenizer: the model's tokenizer (or its name/path).
        num_samples, seq_len (`int`): calibration windows and their length.
        progress (`bool`): progress bar over the blocks.
        calibration_fields: other ``PoTConfig`` calibration fields (``damp_percent``, ``act_order``, ``refine_scales``
            (default `True`: step 2 after the error feedback), ``epochs``, ...).

    Returns:
        The merged model with packed ``PoTLinear`` layers (the ``PeftModel`` wrappers removed), saveable as
        ``"pot"``. ``optimum_pot.peft.merge_errors(model)`` gives each merged layer's relative weight error
        ``‖Q − (W + ΔW)‖ / ‖W + ΔW‖``; ``model.pot_calibration_report`` each block's output error.
    """
    from ..calibration import calibrate
    from ..calibration.weights import FLOAT_ATTR

    cfg = copy.copy(_quantization_config(peft_model.get_base_model()))
    targets = _merged_targets(peft_model)
    if not targets:
        raise ValueError("merge_and_requantize found no active, unmerged LoRA adapter on a PoT layer to merge.")
    fields = dict(rounding="gptq", act_weighted_init=False, refine_scales=True, group_scales="static")
    fields.update(calibration_fields)
    for k, v in dict(fields, tokenizer=tokenizer, num_samples=num_samples, seq_len=seq_len, dataset=None).items():
        setattr(cfg, k, v)
    cfg.post_init()
    model = peft_model.merge_and_unload()  # nearest-level merge: the starting codes, and the scale grid kept
    layers = [m for m in model.modules() if isinstance(m, PoTLinear)]
    for m in layers:
        # Layers without adapters target their own weight: on their own grid it rounds back to the same codes.
        target = targets.get(id(m), m.dequantize_weight(torch.float32))  # [N, K]
        setattr(m, FLOAT_ATTR, target.t() if m.from_conv1d else target)  # kept as the source stores it (Conv1D: [K, N])
    try:
        calibrate(model, cfg, dataset, progress=progress)
    finally:
        for m in layers:
            if hasattr(m, FLOAT_ATTR):
                delattr(m, FLOAT_ATTR)
    for m in layers:
        if id(m) in targets:
            w = targets[id(m)]
            m.merge_error = ((m.dequantize_weight(torch.float32) - w).norm() / w.norm().clamp_min(1e-12)).item()
    return model
