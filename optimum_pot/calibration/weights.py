"""Float weights of the quantised layers: the target of calibration.

After quantisation the float weights are gone from the model, so they come from one of two places:

* ``optimum_pot.quantize(model, config, dataset)`` keeps each float weight on its ``PoTLinear`` as the plain
  attribute ``_float_weight`` until that layer's block is calibrated (then it is dropped);
* ``from_pretrained(..., quantization_config=PoTConfig(dataset=...))`` quantises while loading and keeps nothing;
  calibration re-reads each block's float weights lazily from the checkpoint's safetensors files
  (``model.name_or_path``), one block at a time, so memory stays bounded by one float block.
"""

import json
import os

import torch
from torch import nn

from ..nn.pot_linear import PoTLinear

FLOAT_ATTR = "_float_weight"


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint dir or of a Hub id already in the local cache."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
        except Exception:
            return []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else []


class FloatWeights:
    """Looks up the float weight ``[out_features, in_features]`` of a ``PoTLinear`` by its module name.

    Args:
        model (`torch.nn.Module`): the quantised model (``name_or_path`` locates its float checkpoint).
    """

    def __init__(self, model: nn.Module):
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
        self.path = str(path or "")
        self._key_to_file: dict[str, str] | None = None

    def _keys(self) -> dict[str, str]:
        if self._key_to_file is None:
            from safetensors import safe_open

            self._key_to_file = {}
            for file in _checkpoint_files(self.path) if self.path else []:
                with safe_open(file, framework="pt") as f:
                    self._key_to_file.update({k: file for k in f.keys()})
        return self._key_to_file

    def _read(self, name: str) -> torch.Tensor | None:
        keys = self._keys()
        key = f"{name}.weight"
        if key not in keys:
            # Checkpoints may lack the base-model prefix (``transformer.h.0`` saved as ``h.0``) or add one.
            matches = [k for k in keys if k.endswith("." + key) or key.endswith("." + k)]
            if len(matches) != 1:
                return None
            key = matches[0]
        from safetensors import safe_open

        with safe_open(keys[key], framework="pt") as f:
            return f.get_tensor(key)

    def get(self, name: str, module: PoTLinear) -> torch.Tensor:
        """Float32 ``[N, K]`` weight of ``module`` (named ``name`` in the model)."""
        w = getattr(module, FLOAT_ATTR, None)
        if w is None:
            w = self._read(name)
        if w is None:
            raise ValueError(
                f"PoT calibration needs the float weight of {name} as its target, but the model no longer holds it "
                f"and no checkpoint at {self.path!r} has it. Calibrate while quantising: "
                "optimum_pot.quantize(float_model, config, dataset), or from_pretrained(<local float checkpoint>, "
                "quantization_config=PoTConfig(dataset=..., tokenizer=...))."
            )
        w = w.t() if module.from_conv1d else w  # Conv1D stores [in, out]
        if tuple(w.shape) != (module.out_features, module.in_features):
            raise ValueError(f"Float weight of {name} has shape {tuple(w.shape)}, expected the layer's shape.")
        return w.float()

    @staticmethod
    def release(module: PoTLinear) -> None:
        """Drops a kept float weight once its block is calibrated."""
        if hasattr(module, FLOAT_ATTR):
            delattr(module, FLOAT_ATTR)
