"""Quantisation-aware training: a float layer whose forward pass sees its PoT-quantised weight.

``prepare_qat`` swaps every target ``nn.Linear`` / ``Conv1D`` for a :class:`PoTFakeQuantLinear` that keeps the
*same* float ``weight`` and ``bias`` parameters (so optimizer state and state-dict keys of the float model stay valid)
and adds a learnable float32 ``weight_scale`` ``[N, G]`` (and ``weight_offset`` for level sets with offsets),
initialised by the calibration-free search (``search_scales``). The forward pass quantises with
:func:`~optimum_pot.qat.ste.fake_quantize_ste` (the values and gradients of
:func:`~optimum_pot.format.levels.fake_quantize`, computed in cache-sized chunks): a straight-through estimator for the
weight, true gradients for the scale and offset. ``convert_qat`` turns the trained layers into packed ``PoTLinear``.
"""

import torch
from torch import nn

from ..api import resolve_targets
from ..format.level_set import LevelSet
from ..format.scale_search import search_scales
from ..format.weights import quantize_weight
from ..nn.convert import float_layer, is_conv1d, pot_layers
from ..nn.pot_linear import PoTLinear
from .ste import fake_quantize_ste

# Smallest scale the forward pass uses: a scale pushed to zero or below by the optimizer would flip every sign.
_MIN_SCALE = 2.0**-24
# Bytes of the level-set id stored in checkpoints ("sp2:4:offset" is 12): fixed so the buffer's shape never changes.
_ID_BYTES = 32


def _id_tensor(level_set: LevelSet) -> torch.Tensor:
    raw = level_set.id.encode()[:_ID_BYTES]
    return torch.tensor(list(raw) + [0] * (_ID_BYTES - len(raw)), dtype=torch.uint8)


def _id_of(t: torch.Tensor) -> str:
    return bytes(int(b) for b in t.tolist() if b).decode(errors="replace")


def _fp16_ste(t: torch.Tensor, low: float = -65504.0) -> torch.Tensor:
    """Rounds to float16 in the forward pass (the stored precision), identity in the backward pass.

    Training against exactly the scale (and offset) that will be saved makes the converted packed model compute what
    the last QAT forward pass computed.
    """
    s = t.clamp(low, 65504.0)
    return s + (s.detach().to(torch.float16).float() - s.detach())


class PoTFakeQuantLinear(nn.Module):
    """A float linear layer trained through PoT fake quantisation.

    Parameters:
        weight: the original float weight, same tensor and layout (``[out, in]``, or ``[in, out]`` for ``Conv1D``).
        bias: the original bias, if any.
        weight_scale: ``float32 [out_features, ceil(in_features/group_size)]`` learnable per-group scales.
        weight_offset: ``float32 [out_features, G]`` learnable per-group offsets (level sets with an offset only).

    Args:
        module (`nn.Linear` or `Conv1D`): the float layer; its parameters are shared, not copied.
        level_set (`LevelSet`): the target levels.
        group_size (`int`): input columns per scale.
        grid_points, refine_steps (`int`): the calibration-free search that initialises the scales.
        backend (`str`): kernel of the packed layer ``convert_qat`` will build.
        scale, offset (`torch.Tensor`, *optional*): ``[out_features, G]`` starting scales (and offsets) instead of
            the search, e.g. those of a calibrated model (:func:`prepare_qat` with ``from_quantized=True``).
    """

    def __init__(
        self,
        module: nn.Module,
        level_set: LevelSet,
        group_size: int,
        grid_points: int | None = None,
        refine_steps: int | None = None,
        backend: str = "auto",
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ):
        super().__init__()
        self.from_conv1d = is_conv1d(module)
        self.weight = module.weight
        self.bias = module.bias
        self.level_set, self.backend = level_set, backend
        w = self.float_weight().detach()
        self.out_features, self.in_features = w.shape
        self.group_size = min(group_size, self.in_features)
        if scale is None:
            scale, offset = search_scales(w.float(), level_set, self.group_size, grid_points,
                                          refine_steps=refine_steps)  # fmt: skip
        else:
            scale, offset = scale.float().clone(), None if offset is None else offset.float().clone()
        self.weight_scale = nn.Parameter(scale)
        self.weight_offset = nn.Parameter(offset) if offset is not None else None
        # Saved with training checkpoints, so resuming with another level set fails loudly instead of silently
        # decoding the learned scales on the wrong levels (same shapes at 3 and 4 bits).
        self.register_buffer("weight_levels", _id_tensor(level_set))
        self.register_load_state_dict_pre_hook(PoTFakeQuantLinear._check_checkpoint)

    def _check_checkpoint(self, state_dict, prefix, *args) -> None:
        """Refuses a checkpoint trained with another level set, group size or offset setting (names the fix)."""
        name = prefix.rstrip(".")
        saved = state_dict.get(prefix + "weight_levels")
        problems = []
        if saved is not None and _id_of(saved) != _id_of(self.weight_levels):
            problems.append(f"levels {_id_of(saved)} (this config: {self.level_set.id})")
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and tuple(scale.shape) != tuple(self.weight_scale.shape):
            problems.append(f"{scale.shape[-1]} scale groups (this config: {self.weight_scale.shape[-1]}, group_size "
                            f"{self.group_size})")  # fmt: skip
        if scale is not None and (prefix + "weight_offset" in state_dict) != (self.weight_offset is not None):
            problems.append(f"offset={prefix + 'weight_offset' in state_dict} (this config: "
                            f"offset={self.weight_offset is not None})")  # fmt: skip
        if problems:
            raise ValueError(
                f"This QAT checkpoint cannot be resumed with this PoTConfig: layer {name} was trained with "
                f"{'; '.join(problems)}. Resume with the PoTConfig the run started with (same bits, levels, offset, "
                "group_size and module_bits), or start a new run from the float model."
            )

    def float_weight(self) -> torch.Tensor:
        """The float weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
        return self.weight.t() if self.from_conv1d else self.weight

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantised weight ``[out_features, in_features]`` (differentiable wrt weight, scale, offset)."""
        s = _fp16_ste(self.weight_scale, _MIN_SCALE)
        z = None if self.weight_offset is None else _fp16_ste(self.weight_offset)
        return fake_quantize_ste(self.float_weight(), s, z, self.group_size, self.level_set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_pot_linear(self, name: str = "") -> PoTLinear:
        """The packed layer with the learned scales (codes re-chosen against the float16 scales)."""
        w = self.float_weight().detach()
        scale = self.weight_scale.detach().float().clamp(_MIN_SCALE)
        offset = None if self.weight_offset is None else self.weight_offset.detach().float()
        bias_dtype = None if self.bias is None else self.bias.dtype
        new = PoTLinear(
            self.in_features, self.out_features, self.bias is not None, self.level_set, self.group_size,
            self.backend, self.from_conv1d, bias_dtype=bias_dtype, device=w.device,
        )  # fmt: skip
        new.set_quantized(*quantize_weight(w, self.level_set, self.group_size, name=name, scale=scale,
                                           offset=offset))  # fmt: skip
        if self.bias is not None:
            new.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"levels={self.level_set.id}, group_size={self.group_size}"
        )


def is_qat_prepared(model: nn.Module) -> bool:
    """Whether ``model`` holds fake-quantised layers (``prepare_qat`` ran and ``convert_qat`` did not)."""
    return any(isinstance(m, PoTFakeQuantLinear) for m in model.modules())


@torch.no_grad()
def prepare_qat(model: nn.Module, config, from_quantized: bool = False, train_weights: bool = True) -> nn.Module:
    """Puts a PoT fake-quantiser on every target layer of a float ``model``, in place (idempotent).

    Call it before the optimizer is built (``PoTQATCallback`` does so when the ``Trainer`` is created), so the new
    ``weight_scale`` parameters are optimised and wrapped by DDP.

    Args:
        model (`torch.nn.Module`): a float model (``nn.Linear`` / transformers ``Conv1D`` layers), or with
            ``from_quantized=True`` a quantised one.
        config (`PoTConfig`): level set, bits (``module_bits`` too), group size, ``modules_to_not_convert``.
        from_quantized (`bool`, *optional*, defaults to `False`): start from the packed ``PoTLinear`` layers of
            ``model`` (e.g. a GPTQ-calibrated model) instead of float layers: each latent float weight starts at the
            decoded weight and the scales/offsets at the stored ones, so step 0 *is* that model. Its level sets and
            group size must be ``config``'s.
        train_weights (`bool`, *optional*, defaults to `True`): `False` freezes the latent weights of the
            fake-quantised layers, so training moves only the scales/offsets and the layers left float (norms,
            biases): EfficientQAT's end-to-end training of the quantisation parameters. With
            ``from_quantized=True`` on a calibrated model and a small scale learning rate (:func:`qat_optimizer`),
            the best measured QAT recipe (docs/training.md).

    Returns:
        The same ``model``.
    """
    packed = pot_layers(model)
    if from_quantized:
        _prepare_from_quantized(model, config, packed)
    else:
        _prepare_from_float(model, config, packed)
    if not train_weights:
        for m in model.modules():
            if isinstance(m, PoTFakeQuantLinear):
                m.weight.requires_grad_(False)
    return model


def _prepare_from_float(model: nn.Module, config, packed) -> None:
    if packed:
        raise ValueError(
            "prepare_qat (and PoTQATCallback) needs a float model, but this one already holds packed PoTLinear "
            "layers (loaded with a PoTConfig, quantised, or converted at the end of an earlier QAT run). Load the "
            "float checkpoint (without quantization_config) for QAT, call prepare_qat(model, config, "
            "from_quantized=True) before creating the Trainer to start QAT from these quantised weights, or "
            "fine-tune the packed model with LoRA (get_peft_model, see docs/training.md)."
        )
    config.post_init()
    for name, m in resolve_targets(model, config):
        fq = PoTFakeQuantLinear(m, config.level_set_for(name), config.group_size, config.grid_points,
                                config.refine_steps, config.backend)  # fmt: skip
        model.set_submodule(name, fq)
    model._pot_qat_config = config


def _prepare_from_quantized(model: nn.Module, config, packed) -> None:
    if not packed:
        raise ValueError(
            "prepare_qat(from_quantized=True) needs a model with packed PoTLinear layers; this one has none. "
            "Quantise it first (optimum_pot.quantize or from_pretrained with a PoTConfig)."
        )
    config.post_init()
    for name, m in packed:
        want = config.level_set_for(name)
        if m.level_set != want or m.group_size != min(config.group_size, m.in_features):
            raise ValueError(
                f"prepare_qat(from_quantized=True): layer {name} holds {m.level_set.id}, group {m.group_size}, but the "
                f"config asks for {want.id}, group {config.group_size}. Pass the model's own quantization_config."
            )
        fq = PoTFakeQuantLinear(float_layer(m, torch.float32), m.level_set, m.group_size, backend=config.backend,
                                scale=m.weight_scale, offset=m.weight_offset)  # fmt: skip
        model.set_submodule(name, fq)
    model._pot_qat_config = config


@torch.no_grad()
def convert_qat(model: nn.Module, config=None) -> nn.Module:
    """Replaces every ``PoTFakeQuantLinear`` by a packed ``PoTLinear`` (in place) using the learned scales.

    Transformers models get the ``"pot"`` quantizer attached, so ``save_pretrained`` / ``push_to_hub`` write a
    packed checkpoint that ``from_pretrained`` reloads bit-exact.

    Args:
        model (`torch.nn.Module`): a model prepared by ``prepare_qat``.
        config (`PoTConfig`, *optional*): defaults to the one ``prepare_qat`` used.
    """
    config = config if config is not None else getattr(model, "_pot_qat_config", None)
    if config is None or not is_qat_prepared(model):
        raise ValueError("convert_qat needs a model prepared by prepare_qat(model, config); this one is not.")
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, PoTFakeQuantLinear)]:
        model.set_submodule(name, m.to_pot_linear(name))
    from ..hf.integration import attach_hf_quantizer

    attach_hf_quantizer(model, config)
    if hasattr(model, "_pot_qat_config"):
        del model._pot_qat_config
    return model
