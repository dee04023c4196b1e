"""Plain-PyTorch reference for the packed PoT linear: decode → weight in the activation dtype → matmul.

Every kernel is tested against these functions.
"""

import torch

from ..format.levels import decode, expand_groups, unit_values
from ..format.packing import unpack


def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    zero_level: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decodes a packed weight ``[N, bytes]`` with scales ``[N, G]`` to ``[N, K]`` in ``dtype``."""
    codes = unpack(packed, bits, in_features)
    s_full = expand_groups(scale, group_size, in_features)
    return decode(codes, s_full, bits, zero_level).to(dtype)


def unit_weight(packed: torch.Tensor, bits: int, in_features: int, zero_level: bool) -> torch.Tensor:
    """``(−1)^p · 2^(−e)`` of every packed code, ``[N, K]`` float32 (the scale-free part of the weight)."""
    return unit_values(unpack(packed, bits, in_features), bits, zero_level)


def pot_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    zero_level: bool,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` decoded in ``x``'s dtype; ``x`` is ``[..., K]``, the result ``[..., N]``."""
    w = dequantize_weight(packed, scale, bits, group_size, in_features, zero_level, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
