"""Model surgery: float ``nn.Linear`` / ``Conv1D`` ↔ packed ``PoTLinear``, in place (no transformers import).

transformers' GPT-2-style ``Conv1D`` (weight ``[in, out]``) is recognised by its class name and ``nf`` attribute,
so this layer of the package works on any torch model and never imports transformers.
"""

import re

import torch
from torch import nn

from .fuse import unfuse_projections
from .int8_head import Int8HeadLinear
from .pot_linear import PoTLinear

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (a linear layer with a transposed ``[in, out]`` weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def should_convert(name: str, skips: list[str] | None) -> bool:
    """Whether module ``name`` is converted: no pattern of ``skips`` matches it.

    The rule of transformers' ``should_convert_module``: a pattern matches from the start up to a module boundary
    (``layer.1`` matches ``layer.1.attn``, not ``layer.11``), as a regular expression with the same boundary, or as a
    suffix (``fc1`` matches ``model.layers.3.fc1``).
    """
    if skips is None:
        return True
    return not any(re.match(rf"(?:{p}){_BOUNDARY}", name) or name.endswith(p) for p in skips)


def linear_targets(model: nn.Module, skips: list[str] | None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``Conv1D`` not excluded (a list: callers replace in place)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) or is_conv1d(m)) and should_convert(name, skips)
    ]


def empty_pot_linear(module: nn.Module, level_set, group_size: int, backend: str, pre_quantized: bool) -> PoTLinear:
    """An uninitialised ``PoTLinear`` standing for ``module`` (a meta-device skeleton's layer).

    With ``pre_quantized=False`` it keeps a float ``weight`` placeholder of the original shape, which
    quantise-on-load replaces with packed codes.
    """
    conv = is_conv1d(module)
    w = module.weight
    k, n = (w.shape[0], w.shape[1]) if conv else (module.in_features, module.out_features)
    return PoTLinear(
        k, n, module.bias is not None, level_set, group_size, backend, from_conv1d=conv,
        float_weight_dtype=None if pre_quantized else w.dtype,
        bias_dtype=None if module.bias is None else module.bias.dtype, device=w.device,
    )  # fmt: skip


def pot_layers(model: nn.Module) -> list[tuple[str, PoTLinear]]:
    """``(name, layer)`` of every ``PoTLinear`` of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PoTLinear)]


def float_layer(m: PoTLinear, dtype: torch.dtype) -> nn.Module:
    """The float layer a ``PoTLinear`` stands for: ``nn.Linear``, or ``Conv1D`` when it replaced one."""
    w = m.dequantize_weight(dtype)
    if m.from_conv1d:
        from transformers.pytorch_utils import Conv1D  # only reached for models that came from transformers

        new = Conv1D(m.out_features, m.in_features)
        new.weight = nn.Parameter(w.t().contiguous())
        new.bias = None if m.bias is None else nn.Parameter(m.bias.detach().to(dtype))
        return new.to(w.device)
    new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dtype)
    new.weight = nn.Parameter(w)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().to(dtype))
    return new


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Replaces every ``PoTLinear`` by the float layer it stands for, in place.

    Args:
        model (`nn.Module`): a quantised model.
        dtype (`torch.dtype` or `str`, *optional*): dtype of the float weights (``"bfloat16"`` and ``"auto"`` are
            accepted, as a saved config holds strings); default: each layer's bias dtype, else float32.
    """
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dequantize: unknown dtype {dtype!r}; pass a torch.dtype such as torch.float32.")
    unfuse_projections(model)  # the stacked serving tensors would outlive the layers they stack
    for name, m in pot_layers(model):
        dt = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
        model.set_submodule(name, float_layer(m, dt))
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, Int8HeadLinear)]:
        model.set_submodule(name, m.to_linear())  # the int8 head is a serving copy of a PoT config
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
    layers = pot_layers(model)
    if not layers:
        raise ValueError("set_backend: the model has no PoTLinear layer; quantize it first (optimum_pot.quantize).")
    for _, m in layers:
        m.backend = backend
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and hasattr(config, "backend"):
        config.backend = backend
    return model
