"""``PoTLinear``: a linear layer holding packed codes, per-group scales (and offsets) only (no float weight)."""

import torch
from torch import nn

from ..format.groups import effective_group_size, num_groups
from ..format.level_set import LevelSet
from ..format.packing import packed_row_bytes
from ..format.registry import from_id
from ..format.weights import STORE_DTYPE, dequantize_weight, quantize_weight
from ..library.checks import check_activation, check_packed
from ..library.ops import check_backend, pot_linear, pot_linear_infer, resolve

SCALE_DTYPE = STORE_DTYPE


class PoTLinear(nn.Module):
    """Linear layer with weights ``w = s_g · L[code] (+ z_g)`` stored packed.

    Parameters (the on-disk names, see docs/format.md):
        weight: ``uint8 [out_features, ceil(in_features/8)·bits]`` packed codes (frozen).
        weight_scale: ``float16 [out_features, ceil(in_features/group_size)]`` per-group scales.
        weight_offset: ``float16 [out_features, G]`` per-group offsets, only for level sets with an offset.
        bias: ``[out_features]`` in the model dtype, if any.

    Args:
        in_features (`int`): input size ``K``.
        out_features (`int`): output size ``N``.
        bias (`bool`): whether the layer has a bias.
        level_set (`LevelSet` or `str`): what the codes mean (a :class:`LevelSet` or its id, e.g. ``"sp2:4:offset"``).
        group_size (`int`): input columns per scale (capped at ``in_features``: one group per row).
        backend (`str`): kernel selection, see `PoTConfig`.
        from_conv1d (`bool`): the layer replaced a transformers ``Conv1D`` (GPT-2), whose float weight is
            ``[in, out]``; only used to quantise such a weight on load and to dequantise back.
        float_weight_dtype (`torch.dtype`, *optional*): when set, ``weight`` starts as a float placeholder of the
            original shape (quantise-on-load fills it with packed codes).
    """

    #: ``(FusedProjections, index)`` while the layer is part of a fused group (see ``nn/fuse.py``); a tuple, so
    #: ``nn.Module`` does not register the group as a submodule of each member.
    _fused = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        level_set: LevelSet | str = "pot:4",
        group_size: int = 128,
        backend: str = "auto",
        from_conv1d: bool = False,
        float_weight_dtype: torch.dtype | None = None,
        bias_dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PoTLinear {name} must be a positive integer, got {v!r}.")
        check_backend(backend)
        self.level_set = from_id(level_set) if isinstance(level_set, str) else level_set
        if not isinstance(self.level_set, LevelSet):
            raise ValueError(f"level_set must be a LevelSet or its id, got {level_set!r}.")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = effective_group_size(in_features, group_size)
        self.backend, self.from_conv1d = backend, from_conv1d
        if float_weight_dtype is not None:
            shape = (in_features, out_features) if from_conv1d else (out_features, in_features)
            w = torch.empty(shape, dtype=float_weight_dtype, device=device)
        else:
            w = torch.empty(out_features, packed_row_bytes(in_features, self.bits), dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(w, requires_grad=False)
        g = num_groups(in_features, self.group_size)
        self.weight_scale = nn.Parameter(torch.empty(out_features, g, dtype=SCALE_DTYPE, device=device),
                                         requires_grad=False)  # fmt: skip
        if self.level_set.offset:
            self.weight_offset = nn.Parameter(torch.empty(out_features, g, dtype=SCALE_DTYPE, device=device),
                                              requires_grad=False)  # fmt: skip
        else:
            self.register_parameter("weight_offset", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @property
    def bits(self) -> int:
        return self.level_set.bits

    @property
    def zero_level(self) -> bool:
        return self.level_set.zero_level

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        level_set: LevelSet,
        group_size: int,
        backend: str = "auto",
        grid_points: int | None = None,
        refine_steps: int | None = None,
        name: str = "",
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> "PoTLinear":
        """Quantises an ``nn.Linear`` or transformers ``Conv1D`` (calibration-free unless ``scale`` is given)."""
        from_conv1d = not isinstance(module, nn.Linear)
        w = module.weight.detach()
        w = w.t() if from_conv1d else w  # Conv1D stores [in, out]
        new = cls(
            w.shape[1], w.shape[0], module.bias is not None, level_set, group_size, backend, from_conv1d,
            bias_dtype=None if module.bias is None else module.bias.dtype, device=w.device,
        )  # fmt: skip
        new.set_quantized(*quantize_weight(w, new.level_set, new.group_size, grid_points, refine_steps, name,
                                           scale, offset))  # fmt: skip
        if module.bias is not None:
            new.bias.data = module.bias.detach().clone()
        return new

    @torch.no_grad()
    def set_quantized(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> None:
        """Replaces the packed codes, scales and offsets (checked against the layer's format)."""
        check_packed(packed, scale, offset, None, self.level_set, self.group_size, self.in_features)
        self.weight = nn.Parameter(packed.to(self.weight.device), requires_grad=False)
        self.weight_scale = nn.Parameter(scale.to(SCALE_DTYPE).to(self.weight.device), requires_grad=False)
        if offset is not None:
            self.weight_offset = nn.Parameter(offset.to(SCALE_DTYPE).to(self.weight.device), requires_grad=False)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The decoded weight ``[out_features, in_features]``."""
        return dequantize_weight(self.weight, self.weight_scale, self.weight_offset, self.level_set,
                                 self.group_size, self.in_features, dtype)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._needs_grad(x):
            args = (x, self.weight, self.weight_scale, self.weight_offset, self.bias)
            return pot_linear(*args, self.level_set.id, self.group_size, self.in_features, self.backend)
        fused = self._fused
        if fused is not None:
            y = fused[0].run(x, fused[1])
            if y is not None:
                return y
        return infer_linear(x, self.weight, self.weight_scale, self.weight_offset, self.bias, self.level_set,
                            self.group_size, self.in_features, self.out_features, self.backend)  # fmt: skip

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .bfloat16() cast every floating parameter; scales and offsets are part of the format
        # (float16 on disk and in the kernels), so they move devices but keep their dtype and exact values.
        kept = {n: p.data for n in ("weight_scale", "weight_offset") if (p := getattr(self, n)) is not None}
        out = super()._apply(fn, recurse)
        for name, original in kept.items():
            p = getattr(self, name)
            if p.dtype != SCALE_DTYPE:
                p.data = original.to(p.device)
        return out

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd must see this call (training, LoRA, QAT): then the op with its backward runs."""
        if not torch.is_grad_enabled():
            return False
        params = (self.weight_scale, self.weight_offset, self.bias)
        return x.requires_grad or any(p is not None and p.requires_grad for p in params)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"levels={self.level_set.id}, group_size={self.group_size}, backend={self.backend}"
        )


def infer_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    level_set: LevelSet,
    group_size: int,
    in_features: int,
    out_features: int,
    backend: str,
) -> torch.Tensor:
    """The packed matmul without autograd (inference): ``x [..., K] -> [..., N]`` with ``N = out_features``."""
    args = (x, weight, scale, offset, bias)
    if torch.compiler.is_compiling() or x.device.type not in ("cpu", "cuda"):
        # Graphs and fake/meta tensors need an op. A kernel that is itself one C++ torch op (the CPU kernels) is
        # traced directly, so graphs and AOTInductor packages hold that op, not a Python-implemented one;
        # otherwise the op without autograd, which dispatches ~4x faster than the one with it.
        kernel = resolve(x.device.type, backend) if x.device.type in ("cpu", "cuda") else None
        if getattr(kernel, "traceable", False):
            return kernel(*args, level_set, group_size, in_features)
        return pot_linear_infer(*args, level_set.id, group_size, in_features, backend)
    # Eager inference: call the kernel directly. Even the lean op costs ~8 us a call, a sizeable part of a
    # small layer's GEMV at decode (docs/cpu_kernel.md). The packed tensors were checked when they were set.
    check_activation(x, in_features, out_features, weight.device)
    return resolve(x.device.type, backend)(*args, level_set, group_size, in_features)
