"""Weight-conversion ops of the transformers 5.x loading pipeline."""

from transformers.core_model_loading import ConversionOps

from ..format.weights import quantize_weight
from ..nn.pot_linear import PoTLinear


class PoTQuantize(ConversionOps):
    """Quantise-on-load: one float ``weight`` in; packed ``weight``, ``weight_scale`` (and ``weight_offset``) out.

    Runs as each float tensor is read, so only one float layer is alive at a time.
    """

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, **kwargs) -> dict:
        target_key, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        prefix = target_key.rpartition(".")[0]
        module: PoTLinear = model.get_submodule(prefix)
        w = value.t() if module.from_conv1d else value  # Conv1D stores [in, out]
        if tuple(w.shape) != (module.out_features, module.in_features):
            raise ValueError(
                f"Checkpoint tensor {target_key} has shape {tuple(value.shape)}, expected "
                f"{(module.out_features, module.in_features)} for this model's config; the checkpoint does not "
                "match its config.json."
            )
        cfg = self.hf_quantizer.quantization_config
        # A ValueError here (NaN/Inf weights) lands in transformers' loading report, which then raises.
        packed, scale, offset = quantize_weight(
            w, module.level_set, module.group_size, cfg.grid_points, cfg.refine_steps, name=prefix
        )
        out = {target_key: packed, f"{prefix}.weight_scale": scale}
        if offset is not None:
            out[f"{prefix}.weight_offset"] = offset
        return out
