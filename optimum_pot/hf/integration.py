"""Model surgery for transformers: PoT layers in a skeleton, and a quantised model that saves/pushes as ``"pot"``.

Like transformers' own ``integrations/`` modules: the quantizer (``quantizer.py``) stays thin and calls these.
"""

import types

from torch import nn

from ..nn.convert import empty_pot_linear, linear_targets, pot_layers
from ..nn.pot_linear import PoTLinear


def replace_with_pot_linear(model: nn.Module, config, modules_to_not_convert=None, pre_quantized=True) -> int:
    """Swaps target layers of a (meta-device) skeleton for empty ``PoTLinear`` modules; returns how many.

    Raises:
        ValueError: ``config.module_bits`` names a module that is not converted.
    """
    targets = linear_targets(model, modules_to_not_convert)
    unknown = config.unknown_module_bits(name for name, _ in targets)
    if unknown:
        raise ValueError(
            f"module_bits names {unknown}, which are not quantised linear layers of this model (a typo, or a module "
            "in modules_to_not_convert). Use full module names as printed by model.named_modules()."
        )
    for name, m in targets:
        new = empty_pot_linear(m, config.level_set_for(name), config.group_size, config.backend, pre_quantized)
        model.set_submodule(name, new)
    return len(targets)


def logical_num_parameters(model, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``num_parameters`` counting each PoT layer as its float layer (``N·K`` weights + bias), as bitsandbytes
    does for its packed weights; scales and offsets are not counted (they are no model parameters)."""
    count = type(model).num_parameters(model, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    for _, m in pot_layers(model):
        for name in ("weight", "weight_scale", "weight_offset"):
            p = getattr(m, name)
            if p is not None and (p.requires_grad or not only_trainable):
                count -= p.numel()
        if not only_trainable:
            count += m.out_features * m.in_features
    return count


def attach_model_hooks(model: nn.Module) -> None:
    """Per-instance hooks of a PoT transformers model: the model card on save/push, the logical parameter count.

    Idempotent; only transformers models are hooked.
    """
    from transformers import PreTrainedModel

    from .model_card import attach_card_hooks

    if not isinstance(model, PreTrainedModel):
        return
    attach_card_hooks(model)
    if "num_parameters" not in model.__dict__:
        model.__dict__["num_parameters"] = types.MethodType(logical_num_parameters, model)


def attach_hf_quantizer(model: nn.Module, config) -> None:
    """Makes a transformers model quantised by hand save/push/dequantize like one from ``from_pretrained``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return
    from .quantizer import PoTHfQuantizer

    model.hf_quantizer = PoTHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = "pot"
    model.config._is_quantized = True
    attach_model_hooks(model)


def is_pot_model(model: nn.Module) -> bool:
    return any(isinstance(m, PoTLinear) for m in model.modules())
