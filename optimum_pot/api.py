"""``optimum_pot.quantize``: quantise any torch model in place (optionally calibrated), outside ``from_pretrained``."""

import torch
from torch import nn

from .nn.convert import linear_targets, pot_layers
from .nn.pot_linear import PoTLinear


def default_skips(model: nn.Module) -> list[str]:
    """transformers' defaults (lm_head, tied embeddings) for its models, nothing for other torch models."""
    try:
        from transformers import PreTrainedModel
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:
        return []
    return get_keys_to_not_convert(model) if isinstance(model, PreTrainedModel) else []


def resolve_targets(model: nn.Module, config) -> list[tuple[str, nn.Module]]:
    """The layers ``config`` converts; raises when ``module_bits`` names a module that is not one of them."""
    skips = config.modules_to_not_convert
    targets = linear_targets(model, default_skips(model) if skips is None else skips)
    unknown = config.unknown_module_bits(name for name, _ in targets)
    if unknown:
        raise ValueError(
            f"module_bits names {unknown}, which are not quantised linear layers of this model (a typo, or a module "
            "in modules_to_not_convert). Use full module names as printed by model.named_modules()."
        )
    return targets


@torch.no_grad()
def quantize(model: nn.Module, config, dataset=None) -> nn.Module:
    """Quantises every ``nn.Linear`` and ``Conv1D`` of ``model`` in place to ``PoTLinear``.

    Args:
        model (`torch.nn.Module`): any float torch model; transformers models also become saveable as ``"pot"``.
        config (`PoTConfig`): level set, bits, group size, excluded modules, backend.
        dataset (*optional*): calibration text; overrides ``config.dataset``. With one, the quantised model is
            calibrated block by block (see docs/calibration.md).

    Returns:
        The same ``model``.

    Raises:
        ValueError: the model is already quantised (dequantize it, or load the float model, to re-quantise), or
            ``module_bits`` names unknown modules.
    """
    if pot_layers(model):
        raise ValueError(
            "quantize: this model already holds PoTLinear layers. Re-quantising would mix two configurations; "
            "start from the float model, or call model.dequantize() (optimum_pot.dequantize_model) first."
        )
    config.post_init()  # fields may have been edited since construction
    data = dataset if dataset is not None else config.dataset
    for name, m in resolve_targets(model, config):
        new = PoTLinear.from_float(m, config.level_set_for(name), config.group_size, config.backend,
                                   config.grid_points, config.refine_steps, name)  # fmt: skip
        if data is not None:  # calibration's float target; it drops each one once its block is done
            new._float_weight = m.weight.detach()
        model.set_submodule(name, new)
    from .hf.integration import attach_hf_quantizer

    attach_hf_quantizer(model, config)
    if data is not None:
        with torch.enable_grad():
            from .calibration import calibrate

            calibrate(model, config, data)
    apply_serving(model, config)  # last, as in from_pretrained: serving copies of the final model
    return model


def int8_lm_head(model: nn.Module, name: str | None = None) -> nn.Module:
    """Gives ``model`` the fast CPU output head: an int8 per-row serving copy of its float ``lm_head``.

    Decode-sized inputs on CPU then read 1 byte per head weight instead of 4 (SmolLM2-135M: 28 MB instead of
    113 MB per token); prefill, training and other devices keep the float weight. The float weight stays the
    module's parameter (tied, saved as before); the copy costs 1 byte per head weight of extra memory. Same as
    ``PoTConfig(lm_head="int8")`` at load time. Measured cost: BENCHMARKS.md ("Fast lm_head").

    Args:
        model (`torch.nn.Module`): a transformers model (its ``get_output_embeddings()``) or any model with a
            float ``nn.Linear`` submodule ``name``.
        name (`str`, *optional*): the head's module name; default: transformers' output embeddings, else
            ``"lm_head"``.

    Returns:
        The same ``model``.

    Raises:
        ValueError: there is no such float ``nn.Linear`` (e.g. the head was packed to PoT: keep it in
            ``modules_to_not_convert``).
    """
    from .nn.int8_head import use_int8_head

    if name is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        name = next((n for n, m in model.named_modules() if m is head), "lm_head") if head is not None else "lm_head"
    try:
        model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"int8 lm_head: the model has no module {name!r}; pass the output layer's name.") from e
    use_int8_head(model, name)
    return model


def apply_serving(model: nn.Module, config) -> None:
    """The config's serving options on a loaded (and calibrated) model: the int8 head, fused projections."""
    apply_lm_head(model, config)
    if config.fuse_projections:
        from .nn.fuse import fuse_projections

        fuse_projections(model)


def apply_lm_head(model: nn.Module, config) -> None:
    """``config.lm_head == "int8"``: gives a float head its int8 serving copy; warns when the head was packed."""
    if config.lm_head != "int8":
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, PoTLinear):
        import warnings

        warnings.warn(
            "PoTConfig(lm_head='int8') has no effect: the output head is packed to PoT (it is not in "
            "modules_to_not_convert). Keep 'lm_head' in float to use the int8 serving copy.",
            stacklevel=3,
        )
        return
    int8_lm_head(model)
