"""Input checks in front of every kernel: no input a user can pass reaches a kernel with the wrong shape or dtype.

The C++ kernels check sizes again as a last guard; these checks give the clear message (and the same exception
types as ``nn.Linear``: ``RuntimeError`` for activations it cannot multiply).
"""

import torch

from ..format.groups import num_groups
from ..format.level_set import LevelSet
from ..format.packing import packed_row_bytes


def check_activation(x: torch.Tensor, in_features: int, out_features: int, weight_device: torch.device) -> None:
    """``x`` ``[..., K]``: floating point, ``K = in_features``, on the weight's device (as ``nn.Linear`` demands)."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        shape = f"{rows}x{x.shape[-1] if x.dim() else 0}"
        raise RuntimeError(
            f"mat1 and mat2 shapes cannot be multiplied ({shape} and {in_features}x{out_features}): the PoT layer "
            f"takes inputs whose last dimension is in_features={in_features}, got shape {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise RuntimeError(f"PoT linear layers take floating-point inputs (like nn.Linear), got {x.dtype}; cast x.")
    if x.device != weight_device and not (x.device.type == weight_device.type == "meta"):
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but the input is on {x.device} and the PoT weight on "
            f"{weight_device}; move the model or the input (model.to(device))."
        )


def check_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    level_set: LevelSet,
    group_size: int,
    in_features: int,
) -> None:
    """The packed tensors agree with the format parameters (raises `ValueError` naming the disagreement)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}.")
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ValueError(f"in_features must be a positive integer, got {in_features!r}.")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"Packed PoT codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}.")
    n, row_bytes = packed.shape
    if row_bytes != packed_row_bytes(in_features, level_set.bits):
        raise ValueError(
            f"Packed codes have {row_bytes} bytes per row; in_features={in_features} at {level_set.bits} bits needs "
            f"{packed_row_bytes(in_features, level_set.bits)}. The weights do not match the layer's format."
        )
    groups = (n, num_groups(in_features, group_size))
    for what, t in (("scale", scale), ("offset", offset)):
        if t is None:
            continue
        if not t.is_floating_point() or tuple(t.shape) != groups:
            raise ValueError(f"PoT {what} must be a float tensor of shape {groups}, got {t.dtype} {tuple(t.shape)}.")
    if level_set.offset != (offset is not None):
        raise ValueError(f"Level set {level_set.id} {'needs' if level_set.offset else 'takes no'} per-group offsets.")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}.")
