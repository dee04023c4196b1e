"""In-place model conversion: float ``nn.Linear`` / ``Conv1D`` ↔ packed ``PoTLinear``."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from .pot_linear import PoTLinear


def _targets(model: nn.Module, modules_to_not_convert: list[str] | None):
    """``(name, module)`` of every ``nn.Linear`` / ``Conv1D`` not excluded (a list: callers replace in place)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and should_convert_module(name, modules_to_not_convert)
    ]


def replace_with_pot_linear(model: nn.Module, config, modules_to_not_convert=None, pre_quantized=True) -> int:
    """Swaps target layers of a (meta-device) skeleton for empty ``PoTLinear`` modules; returns how many.

    With ``pre_quantized=False`` the new modules keep a float ``weight`` placeholder of the original shape,
    which quantise-on-load (``hf/ops.py``) replaces with packed codes.
    """
    count = 0
    for name, m in _targets(model, modules_to_not_convert):
        conv = isinstance(m, Conv1D)
        w = m.weight
        k, n = (w.shape[0], w.shape[1]) if conv else (m.in_features, m.out_features)
        new = PoTLinear(
            k,
            n,
            m.bias is not None,
            config.bits_for(name),
            config.group_size,
            config.zero_level,
            config.backend,
            from_conv1d=conv,
            float_weight_dtype=None if pre_quantized else w.dtype,
            bias_dtype=None if m.bias is None else m.bias.dtype,
            device=w.device,
        )
        model.set_submodule(name, new)
        count += 1
    return count


def _default_skips(model: nn.Module) -> list[str]:
    """transformers' defaults (lm_head, tied embeddings) for its models, nothing for other torch models."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model) if isinstance(model, PreTrainedModel) else []


@torch.no_grad()
def quantize(model: nn.Module, config, dataset=None) -> nn.Module:
    """Quantises every ``nn.Linear`` and ``Conv1D`` of ``model`` in place to ``PoTLinear``.

    Args:
        model (`torch.nn.Module`): any torch model; transformers models also become saveable as ``"pot"``.
        config (`PoTConfig`): bits, group size, excluded modules, backend.
        dataset (*optional*): calibration text; overrides ``config.dataset``. With one, PoTPTQ step 2 refines
            the scales after the calibration-free quantisation.

    Returns:
        The same ``model``.
    """
    skips = config.modules_to_not_convert
    if skips is None:
        skips = _default_skips(model)
    data = dataset if dataset is not None else config.dataset
    for name, m in _targets(model, skips):
        new = PoTLinear.from_float(
            m, config.bits_for(name), config.group_size, config.zero_level, config.backend, config.grid_points, name
        )
        if data is not None:  # calibration's float target; it drops each one once its block is done
            new._float_weight = m.weight.detach()
        model.set_submodule(name, new)
    _attach_hf_quantizer(model, config)
    if data is not None:
        with torch.enable_grad():
            from ..calibration import calibrate

            calibrate(model, config, data)
    return model


def _attach_hf_quantizer(model: nn.Module, config) -> None:
    """Makes a transformers model quantised by hand save/push/dequantize like one from ``from_pretrained``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    from ..hf.quantizer import PoTHfQuantizer

    model.hf_quantizer = PoTHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = "pot"
    model.config._is_quantized = True

    from ..hf.model_card import attach_card_hooks

    attach_card_hooks(model)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every ``PoTLinear`` by the float layer it stands for (``nn.Linear``, or ``Conv1D`` for GPT-2)."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, PoTLinear)]:
        dt = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
        w = m.dequantize_weight(dt)
        if m.from_conv1d:
            new = Conv1D(m.out_features, m.in_features)
            new.weight = nn.Parameter(w.t().contiguous())
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dt)
            new.weight = nn.Parameter(w)
        if m.bias is not None:
            new.bias = nn.Parameter(m.bias.detach().to(dt))
        elif m.from_conv1d:
            new.bias = None
        model.set_submodule(name, new.to(w.device))
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switches the forward kernel of every ``PoTLinear`` of ``model`` (and its saved ``quantization_config``).

    Args:
        model (`nn.Module`): a quantised model.
        backend (`str`): one of ``optimum_pot.library.ops.BACKENDS`` (e.g. ``"cpu_int8"`` for faster CPU decode).

    Raises:
        ValueError: unknown backend, or no ``PoTLinear`` in ``model``.
    """
    from ..library.ops import check_backend

    check_backend(backend)
    layers = [m for m in model.modules() if isinstance(m, PoTLinear)]
    if not layers:
        raise ValueError("set_backend: the model has no PoTLinear layer; quantize it first (optimum_pot.quantize).")
    for m in layers:
        m.backend = backend
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and hasattr(config, "backend"):
        config.backend = backend
    return model
