"""``PoTLoraLinear``: LoRA on a packed, frozen ``PoTLinear`` (QLoRA-style: float adapters, PoT base).

Forward: ``y = PoTLinear(x) + scaling · B(A(dropout(x)))``; only ``A`` and ``B`` train. Merging decodes the base,
adds ``scaling · B @ A`` and projects the sum back onto the PoT grid (PoTPTQ step 1 scale search, then nearest codes),
so a merged model stays packed and saveable as ``"pot"``. The projection is lossy: every merge records its error
(relative Frobenius norm ``‖Q(W + ΔW) − (W + ΔW)‖ / ‖W + ΔW‖``) on the base layer as ``merge_error``; read them all
with :func:`merge_errors`. ``unmerge`` restores the exact pre-merge codes and scales.
"""

import logging

import torch
from peft.tuners.lora.layer import Linear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..format.weights import dequantize_weight, quantize_weight
from ..nn.pot_linear import PoTLinear

logger = logging.getLogger(__name__)


class PoTLoraLinear(Linear):
    """A peft LoRA ``Linear`` whose base layer is a packed ``PoTLinear``.

    Args:
        base_layer (`PoTLinear`): the packed layer (kept frozen).
        adapter_name (`str`): the adapter's name.
        config (`peft.LoraConfig`): the LoRA configuration (``r``, ``lora_alpha``, dropout, init).
        grid_points (`int`, *optional*): candidates of the scale search when merging (default: the level set's).
    """

    def __init__(self, base_layer, adapter_name: str, config, grid_points: int | None = None, **kwargs):
        unsupported = [
            name for name in ("use_dora", "lora_bias", "use_bdlora", "velora_config", "kasa_config")
            if getattr(config, name, None)
        ]  # fmt: skip
        if unsupported:
            raise ValueError(
                f"LoRA on packed PoT layers supports plain LoRA only; set {unsupported} off in LoraConfig (they need "
                "a float base weight), or dequantize the model first with model.dequantize()."
            )
        kwargs.pop("is_target_conv_1d_layer", None)
        super().__init__(base_layer, adapter_name, config, **kwargs)
        # PoTLinear computes x @ W.T for GPT-2 Conv1D layers too: never transpose the delta (the shared config may
        # say fan_in_fan_out=True for the model's float Conv1D layers).
        self.fan_in_fan_out = False
        self.grid_points = grid_points
        self._pot_backups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # peft's generic lookup warns "unsupported layer type" for any layer it does not know.
        return module.in_features, module.out_features

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merges adapters into the base and re-quantises it onto the PoT grid (records ``merge_error``).

        Args:
            safe_merge (`bool`): raise before touching the base if the merged weight has NaN/Inf.
            adapter_names (`list[str]`, *optional*): adapters to merge; all active ones by default.
        """
        adapter_names = [a for a in (check_adapters_to_merge(self, adapter_names) or []) if a in self.lora_A]
        if not adapter_names:
            return
        base: PoTLinear = self.get_base_layer()
        w = base.dequantize_weight(torch.float32)  # [N, K]
        for adapter in adapter_names:
            w = w + self.get_delta_weight(adapter).float()
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights; the adapters {adapter_names} seem to be broken.")
        packed, scale, offset = quantize_weight(w, base.level_set, base.group_size, self.grid_points)
        q = dequantize_weight(packed, scale, offset, base.level_set, base.group_size, base.in_features)
        base.merge_error = ((q - w).norm() / w.norm().clamp_min(1e-12)).item()
        self._pot_backups.append(
            (base.weight.data, base.weight_scale.data, None if offset is None else base.weight_offset.data)
        )
        base.set_quantized(packed, scale, offset)
        self.merged_adapters.extend(adapter_names)
        logger.info("Merged %s into a PoT layer: relative merge error %.4f", adapter_names, base.merge_error)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restores the exact packed weight and scales from before the last merges."""
        if not self.merged:
            return
        base: PoTLinear = self.get_base_layer()
        while self._pot_backups:
            base.set_quantized(*self._pot_backups.pop())
        self.merged_adapters.clear()
        if hasattr(base, "merge_error"):
            del base.merge_error

    def __repr__(self) -> str:
        return "pot_lora." + super().__repr__()


def merge_errors(model: nn.Module) -> dict[str, float]:
    """``{module name: relative merge error}`` of every PoT layer a LoRA merge re-quantised.

    Works on the model ``merge_and_unload()`` returns (and on a merged ``PeftModel``).
    """
    return {
        name: m.merge_error
        for name, m in model.named_modules()
        if isinstance(m, PoTLinear) and hasattr(m, "merge_error")
    }


def dispatch_pot(target: nn.Module, adapter_name: str, config, **kwargs) -> nn.Module | None:
    """peft dispatcher: a ``PoTLoraLinear`` for a ``PoTLinear`` target, else ``None`` (peft tries the next one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, PoTLinear) or kwargs.get("parameter_name") is not None:
        return None
    for key in ("loaded_in_8bit", "loaded_in_4bit", "parameter_name", "get_apply_tensor_subclass"):
        kwargs.pop(key, None)
    return PoTLoraLinear(target, adapter_name, config=config, **kwargs)
