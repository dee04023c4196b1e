"""Groups of input columns: one scale (and offset) per ``group_size`` consecutive columns of a row."""

import torch


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is partial when ``group_size`` does not divide ``in_features``."""
    return -(-in_features // group_size)


def effective_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` capped at the row length: a group larger than the layer is one group per row."""
    return max(1, min(group_size, in_features))


def expand_groups(values: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeats each group's value over its columns: ``[N, G] -> [N, K]`` (the last group may be partial)."""
    return values.repeat_interleave(group_size, dim=-1)[..., :in_features]


def group_view(w: torch.Tensor, group_size: int, fill: float = 0.0) -> torch.Tensor:
    """Pads the columns with ``fill`` to whole groups and views them as ``[N, G, group_size]``."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad), value=fill)
    return w.reshape(n, -1, group_size)


def group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Largest magnitude of each group: ``[N, K] -> [N, G]`` in float32 (zero padding never wins)."""
    return group_view(w.float().abs(), group_size).amax(dim=-1)


def group_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum of each group's columns: ``[..., K] -> [..., G]`` (an offset's contribution is ``z · Σ_group x``)."""
    k = x.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, group_size).sum(-1)
