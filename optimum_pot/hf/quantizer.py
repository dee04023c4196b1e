"""``PoTHfQuantizer``: the ``"pot"`` backend of ``from_pretrained`` (transformers 5.x quantizer API)."""

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..format.groups import num_groups
from ..format.packing import packed_row_bytes
from ..format.weights import STORE_DTYPE, quantize_weight
from ..nn.convert import dequantize_model, pot_layers
from ..nn.pot_linear import PoTLinear
from .checkpoint import (
    check_agreement,
    check_tensor_layout,
    checkpoint_metadata,
    read_metadata,
    verify_digests,
    verify_on_load,
)
from .integration import attach_model_hooks, replace_with_pot_linear


class PoTHfQuantizer(HfQuantizer):
    """Quantises float checkpoints while loading (param by param) and loads packed ``"pot"`` checkpoints.

    Args:
        quantization_config (`PoTConfig`): the configuration.
    """

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._pot_modules: set[str] = set()
        self._metadata: dict | None = None

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
        # Packed codes, scales and offsets are never cast: a wrong dtype on disk must surface as an error, not be
        # silently converted (a float weight cast to uint8 would load as garbage).
        target = converter.target_patterns[0] if getattr(converter, "target_patterns", None) else ""
        prefix, _, tensor = target.rpartition(".")
        if prefix in self._pot_modules and tensor in ("weight", "weight_scale", "weight_offset"):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, checkpoint_files=None,
                                             **kwargs):  # fmt: skip
        cfg = self.quantization_config
        cfg.post_init()  # a config edited after construction is checked again
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None)
        )
        # Record the resolved list so a reload rebuilds exactly the same modules.
        cfg.modules_to_not_convert = sorted(self.modules_to_not_convert)
        replace_with_pot_linear(model, cfg, self.modules_to_not_convert, self.pre_quantized)
        modules = dict(pot_layers(model))
        self._pot_modules = set(modules)
        if self.pre_quantized:
            self._metadata = read_metadata(checkpoint_files)
            if self._metadata is not None:
                check_agreement(self._metadata, modules)
            check_tensor_layout(checkpoint_files, modules)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            self._quantize_tied_head(model)
        modules = dict(pot_layers(model))
        for name, module in modules.items():
            validate_loaded(name, module)
        if self.pre_quantized and self._metadata is not None and verify_on_load():
            verify_digests(self._metadata, modules)
        cfg = self.quantization_config
        if not self.pre_quantized and cfg.dataset is not None:
            from ..calibration import calibrate

            calibrate(model, cfg, cfg.dataset)
        from ..api import apply_serving

        apply_serving(model, cfg)
        attach_model_hooks(model)  # model card on save/push, logical num_parameters
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
        head.set_quantized(*quantize_weight(emb.weight.detach(), head.level_set, head.group_size, cfg.grid_points,
                                            cfg.refine_steps, name=name))  # fmt: skip
        for t in (head.weight, head.weight_scale, head.weight_offset):
            if t is not None:
                t._is_hf_initialized = True

    def get_state_dict_and_metadata(self, model):
        from ..config import FORMAT_VERSION

        return None, checkpoint_metadata(model, FORMAT_VERSION)

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
    """Raises naming the tensor when a packed module was not filled from the checkpoint, has the wrong layout, or
    holds scales that are not finite and non-negative (or offsets that are not finite)."""
    g = num_groups(module.in_features, module.group_size)
    expected = {
        "weight": (torch.uint8, (module.out_features, packed_row_bytes(module.in_features, module.bits))),
        "weight_scale": (STORE_DTYPE, (module.out_features, g)),
    }
    if module.level_set.offset:
        expected["weight_offset"] = (STORE_DTYPE, (module.out_features, g))
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
                f"PoT checkpoint tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape} for level set "
                f"{module.level_set.id}, group_size={module.group_size}; the checkpoint does not match its "
                "config.json."
            )
    bad_scale = ~torch.isfinite(module.weight_scale) | (module.weight_scale < 0)
    bad_offset = None if module.weight_offset is None else ~torch.isfinite(module.weight_offset)
    if bad_scale.any() or (bad_offset is not None and bad_offset.any()):
        raise ValueError(
            f"PoT checkpoint tensor {name}.weight_scale/weight_offset holds NaN, Inf or negative scales "
            f"({int(bad_scale.sum())} bad scale(s)); the checkpoint is corrupted. Re-download or re-quantise it."
        )
