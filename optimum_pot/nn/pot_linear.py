"""``PoTLinear``: a linear layer holding packed PoT codes and per-group scales only (no float weight)."""

import torch
from torch import nn

from ..format.levels import encode, expand_groups, num_groups
from ..format.packing import pack, packed_row_bytes
from ..format.scale_search import FP16_MAX, search_scales
from ..library.ops import pot_linear, pot_linear_infer, resolve
from ..library.reference import dequantize_weight

SCALE_DTYPE = torch.float16


class PoTLinear(nn.Module):
    """Linear layer with weights ``w = s_g · (−1)^p · 2^(−e)`` stored packed.

    Parameters (the on-disk names, see docs/format.md):
        weight: ``uint8 [out_features, ceil(in_features/8)·bits]`` packed codes (frozen).
        weight_scale: ``float16 [out_features, ceil(in_features/group_size)]`` per-group scales.
        bias: ``[out_features]`` in the model dtype, if any.

    Args:
        in_features (`int`): input size ``K``.
        out_features (`int`): output size ``N``.
        bias (`bool`): whether the layer has a bias.
        bits (`int`): 2, 3 or 4.
        group_size (`int`): input columns per scale.
        zero_level (`bool`): whether the last exponent code means zero.
        backend (`str`): kernel selection, see `PoTConfig`.
        from_conv1d (`bool`): the layer replaced a transformers ``Conv1D`` (GPT-2), whose float weight is
            ``[in, out]``; only used to quantise such a weight on load and to dequantise back.
        float_weight_dtype (`torch.dtype`, *optional*): when set, ``weight`` starts as a float placeholder of the
            original shape (quantise-on-load fills it with packed codes).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 128,
        zero_level: bool = True,
        backend: str = "auto",
        from_conv1d: bool = False,
        float_weight_dtype: torch.dtype | None = None,
        bias_dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_level = bits, group_size, zero_level
        self.backend, self.from_conv1d = backend, from_conv1d
        if float_weight_dtype is not None:
            shape = (in_features, out_features) if from_conv1d else (out_features, in_features)
            w = torch.empty(shape, dtype=float_weight_dtype, device=device)
        else:
            w = torch.empty(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        g = num_groups(in_features, group_size)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, g, dtype=SCALE_DTYPE, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        bits: int,
        group_size: int,
        zero_level: bool = True,
        backend: str = "auto",
        grid_points: int = 32,
        name: str = "",
        scale: torch.Tensor | None = None,
    ) -> "PoTLinear":
        """Quantises an ``nn.Linear`` or transformers ``Conv1D`` (calibration-free unless ``scale`` is given)."""
        from_conv1d = not isinstance(module, nn.Linear)
        w = module.weight.detach()
        w = w.t() if from_conv1d else w  # Conv1D stores [in, out]
        new = cls(
            w.shape[1],
            w.shape[0],
            module.bias is not None,
            bits,
            group_size,
            zero_level,
            backend,
            from_conv1d,
            bias_dtype=None if module.bias is None else module.bias.dtype,
            device=w.device,
        )
        packed, scales = quantize_weight(w, bits, group_size, zero_level, grid_points, name, scale)
        new.weight.data, new.weight_scale.data = packed, scales
        if module.bias is not None:
            new.bias.data = module.bias.detach().clone()
        return new

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]``."""
        return dequantize_weight(
            self.weight, self.weight_scale, self.bits, self.group_size, self.in_features, self.zero_level, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (x, self.weight, self.weight_scale, self.bias, self.bits, self.group_size, self.in_features)
        if self._needs_grad(x):
            return pot_linear(*args, self.zero_level, self.backend)
        if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
            # Graphs and fake/meta tensors need an op; the one without autograd dispatches ~4x faster.
            return pot_linear_infer(*args, self.zero_level, self.backend)
        # Eager inference: call the kernel directly. Even the lean op costs ~8 us a call, a sizeable part of a
        # small layer's GEMV at decode (docs/cpu_kernel.md).
        return resolve(x.device.type, self.backend)(*args, self.zero_level)

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd must see this call (training, LoRA, QAT): then the op with its backward runs."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p is not None and p.requires_grad for p in (self.weight_scale, self.bias))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, zero_level={self.zero_level}, backend={self.backend}"
        )


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raises if ``w`` has NaN or Inf: quantising them would silently corrupt a whole group."""
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"Layer {name or '<unnamed>'} has {bad} NaN/Inf weight value(s); PoT cannot quantise them. "
            "Fix or re-export the checkpoint (or add the layer to modules_to_not_convert)."
        )


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    zero_level: bool,
    grid_points: int = 32,
    name: str = "",
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``[N, K]`` → (packed ``uint8 [N, bytes]``, ``float16 [N, G]`` scales). Pure, apart from the checks."""
    check_finite(w, name)
    w = w.float()
    if scale is None:
        scale = search_scales(w, group_size, bits, zero_level, grid_points)
    if scale.abs().max() > FP16_MAX:
        raise ValueError(
            f"Layer {name or '<unnamed>'} has weights above {FP16_MAX:g}, beyond the float16 scale range; "
            "add it to modules_to_not_convert."
        )
    scale = scale.to(SCALE_DTYPE)
    codes = encode(w, expand_groups(scale.float(), group_size, w.shape[1]), bits, zero_level)
    return pack(codes, bits), scale
