"""``PoTHfQuantizer``: the ``"pot"`` backend of ``from_pretrained`` (transformers 5.x quantizer API)."""

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..format.levels import num_groups
from ..format.packing import packed_row_bytes
from ..nn.pot_linear import SCALE_DTYPE, PoTLinear, quantize_weight
from ..nn.quantize import dequantize_model, replace_with_pot_linear
from .model_card import attach_card_hooks


class PoTHfQuantizer(HfQuantizer):
    """Quantises float checkpoints while loading (param by param) and loads packed ``"pot"`` checkpoints.

    Args:
        quantization_config (`PoTConfig`): the configuration.
    """

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._pot_modules: set[str] = set()

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values() and not self.pre_quantized:
            raise ValueError(
                "PoT quantises while loading and cannot write to disk offload; load without disk offload "
                "(packed weights are 4-8x smaller), or quantise once and load the saved checkpoint."
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, PoTLinear) and tensor_name == "weight"

    def get_new_dtype(self, converter, param, dtype):
        # Packed codes and scales are never cast: a wrong dtype on disk must surface as an error, not be
        # silently converted (a float weight cast to uint8 would load as garbage).
        target = converter.target_patterns[0] if getattr(converter, "target_patterns", None) else ""
        if target.rpartition(".")[0] in self._pot_modules and target.endswith(("weight", "weight_scale")):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
        )
        # Record the resolved list so a reload rebuilds exactly the same modules.
        cfg.modules_to_not_convert = sorted(self.modules_to_not_convert)
        replace_with_pot_linear(model, cfg, self.modules_to_not_convert, self.pre_quantized)
        self._pot_modules = {n for n, m in model.named_modules() if isinstance(m, PoTLinear)}

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            self._quantize_tied_head(model)
        for name, module in model.named_modules():
            if isinstance(module, PoTLinear):
                validate_loaded(name, module)
        cfg = self.quantization_config
        if not self.pre_quantized and cfg.dataset is not None:
            from ..calibration import calibrate

            calibrate(model, cfg, cfg.dataset)
        attach_card_hooks(model)  # save_pretrained / push_to_hub write the PoT model card
        return model

    def _quantize_tied_head(self, model) -> None:
        """A tied lm_head that is to be packed (``modules_to_not_convert=[]``) has no tensor of its own in a float
        checkpoint: quantise it from the input embedding it is tied to."""
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if not isinstance(head, PoTLinear) or emb is None or head.from_conv1d:
            return
        w = head.weight
        loaded = w.dtype == torch.uint8 and getattr(w, "_is_hf_initialized", False) and w.device.type != "meta"
        if loaded or tuple(emb.weight.shape) != (head.out_features, head.in_features):
            return
        cfg = self.quantization_config
        name = next(n for n, m in model.named_modules() if m is head)
        packed, scale = quantize_weight(emb.weight.detach(), head.bits, head.group_size, head.zero_level,
                                        cfg.grid_points, name=name)  # fmt: skip
        head.weight = torch.nn.Parameter(packed, requires_grad=False)
        head.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        for t in (head.weight, head.weight_scale):
            t._is_hf_initialized = True

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def get_quantize_ops(self):
        from .ops import PoTQuantize

        return PoTQuantize(self)

    def _dequantize(self, model, dtype=None):
        return dequantize_model(model, dtype)


def validate_loaded(name: str, module: PoTLinear) -> None:
    """Raises naming the tensor when a packed module was not filled from the checkpoint, or has the wrong layout."""
    expected = {
        "weight": (torch.uint8, (module.out_features, packed_row_bytes(module.in_features, module.bits))),
        "weight_scale": (SCALE_DTYPE, (module.out_features, num_groups(module.in_features, module.group_size))),
    }
    for tensor_name, (dtype, shape) in expected.items():
        t = getattr(module, tensor_name)
        key = f"{name}.{tensor_name}"
        if not getattr(t, "_is_hf_initialized", False) or t.device.type == "meta":
            raise ValueError(
                f"PoT checkpoint is missing tensor {key}; the checkpoint is incomplete or corrupted. "
                "Re-save it with optimum_pot or re-download it."
            )
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"PoT checkpoint tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} for bits="
                f"{module.bits}, group_size={module.group_size}; the checkpoint does not match its config.json."
            )
