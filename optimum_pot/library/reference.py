"""Plain-PyTorch reference for the packed linear: decode → weight in the activation dtype → matmul.

Every kernel is tested against this function (tests/test_conformance.py).
"""

import torch

from ..format.level_set import LevelSet
from ..format.weights import dequantize_weight


def pot_linear_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    level_set: LevelSet,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` decoded in ``x``'s dtype; ``x`` is ``[..., K]``, the result ``[..., N]``."""
    w = dequantize_weight(packed, scale, offset, level_set, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
