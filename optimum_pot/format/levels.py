"""Pure quantisation math over a :class:`~.level_set.LevelSet`: encode, decode, fake-quantise.

A weight is ``w = s · L[code] (+ z)``: ``s`` the group's scale, ``L`` the level set's values, ``z`` the group's
offset when the level set has one. Encoding picks the **nearest level** of ``r = (w − z) / s`` (a value exactly
halfway between two levels takes the lower one); a zero scale (an all-zero group) encodes every weight as the level
nearest zero. Every kernel is tested against :func:`decode`.
"""

import torch

from .groups import expand_groups, num_groups
from .level_set import LevelSet


def value_table(level_set: LevelSet, device=None) -> torch.Tensor:
    """``L``: the unit value of every code, float32 ``[2^bits]``."""
    return torch.tensor(level_set.values, dtype=torch.float32, device=device)


def is_uniform(level_set: LevelSet) -> bool:
    """Whether the distinct levels are equally spaced (nearest level is then a rounding, no search)."""
    lv = level_set.levels
    steps = {b - a for a, b in zip(lv, lv[1:])}
    return len(steps) == 1


MAX_BINS = 1 << 12  # largest lookup table of the bin search (finer level sets use a binary search)
_BIN_TABLES: dict = {}


def _bins(level_set: LevelSet) -> tuple[float, int] | None:
    """``(width, count)`` of equal bins over the levels' range whose edges include every midpoint, or ``None``.

    Levels are dyadic, so with the finest power of two ``2^-F`` among them every midpoint is a multiple of
    ``2^-(F+1)``: bins of that width never straddle a midpoint, and one table lookup finds the nearest level.
    """
    lv = level_set.levels
    width = 1.0
    while any(not (m / width).is_integer() for m in (*level_set.midpoints, lv[0])):
        width /= 2
    count = round((lv[-1] - lv[0]) / width)
    return (width, count) if count <= MAX_BINS else None


def _bin_table(level_set: LevelSet, device) -> torch.Tensor:
    key = (level_set.id, str(device))
    table = _BIN_TABLES.get(key)
    if table is None:
        width, count = _bins(level_set)
        lv, mids = level_set.levels, torch.tensor(level_set.midpoints, dtype=torch.float64)
        centers = lv[0] + (torch.arange(count, dtype=torch.float64) + 0.5) * width
        table = torch.bucketize(centers, mids).to(device)
        _BIN_TABLES[key] = table
    return table


def nearest_level_index(r: torch.Tensor, level_set: LevelSet) -> torch.Tensor:
    """Index into ``level_set.levels`` (ascending) of the level nearest to each ``r`` (ties: the lower level).

    Returns int64 indices of ``r``'s shape; NaN inputs give an unspecified valid index (callers reject NaN first).
    """
    lv = level_set.levels
    if is_uniform(level_set):
        step = lv[1] - lv[0]
        # ceil(x - 0.5) rounds halves down, like the midpoint search below.
        idx = torch.ceil((r - lv[0]) / step - 0.5)
        return idx.clamp_(0, len(lv) - 1).to(torch.int64)
    bins = _bins(level_set)
    if bins is None:
        mids = torch.tensor(level_set.midpoints, dtype=r.dtype, device=r.device)
        return torch.bucketize(r, mids, right=False)
    width, count = bins
    # Bin j holds (lv0 + j·width, lv0 + (j+1)·width]: a midpoint on its right edge stays with the lower level.
    j = torch.ceil((r - lv[0]) * (1.0 / width)).sub_(1).clamp_(0, count - 1).to(torch.int64)
    return _bin_table(level_set, r.device)[j]


def nearest_levels(r: torch.Tensor, level_set: LevelSet) -> torch.Tensor:
    """The nearest level's value for each unit-domain ``r`` (float32)."""
    levels = torch.tensor(level_set.levels, dtype=torch.float32, device=r.device)
    return levels[nearest_level_index(r, level_set)]


def unit_ratio(w: torch.Tensor, scale_full: torch.Tensor, offset_full: torch.Tensor | None) -> torch.Tensor:
    """``r = (w − z) / s`` in float32, with ``r = 0`` where ``s = 0``."""
    s = scale_full.float()
    num = w.float() if offset_full is None else w.float() - offset_full.float()
    return torch.where(s > 0, num / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(num))


def encode(
    w: torch.Tensor, scale_full: torch.Tensor, offset_full: torch.Tensor | None, level_set: LevelSet
) -> torch.Tensor:
    """Codes (``uint8``) of ``w`` on the grid of ``scale_full`` and ``offset_full`` (all ``[N, K]``)."""
    idx = nearest_level_index(unit_ratio(w, scale_full, offset_full), level_set)
    canonical = torch.tensor(level_set.canonical_codes, dtype=torch.uint8, device=w.device)
    return canonical[idx]


def unit_values(codes: torch.Tensor, level_set: LevelSet) -> torch.Tensor:
    """``L[code]`` of each code, float32."""
    return value_table(level_set, codes.device)[codes.to(torch.int64)]


def decode(
    codes: torch.Tensor, scale_full: torch.Tensor, offset_full: torch.Tensor | None, level_set: LevelSet
) -> torch.Tensor:
    """The reference decode: ``s · L[code] (+ z)`` in float32, ``[N, K]``."""
    w = scale_full.float() * unit_values(codes, level_set)
    return w if offset_full is None else w + offset_full.float()


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    level_set: LevelSet,
    group_size: int,
) -> torch.Tensor:
    """Codes ``[N, K]`` with per-group ``scale`` / ``offset`` ``[N, G]`` → float32 weight ``[N, K]``."""
    k = codes.shape[-1]
    z = None if offset is None else expand_groups(offset, group_size, k)
    return decode(codes, expand_groups(scale, group_size, k), z, level_set)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
    level_set: LevelSet,
) -> torch.Tensor:
    """Differentiable quantisation of ``w`` ``[N, K]`` with per-group ``scale`` (and ``offset``) ``[N, G]``.

    Codes come from detached values; the gradient reaches ``scale`` and ``offset`` through ``s · L + z`` and ``w``
    through a straight-through estimator, so all three can be learned (calibration and QAT use this).
    """
    k = w.shape[-1]
    if scale.shape[-1] != num_groups(k, group_size):
        raise ValueError(f"scale has {scale.shape[-1]} groups; {k} columns in groups of {group_size} need "
                         f"{num_groups(k, group_size)}.")  # fmt: skip
    s_full = expand_groups(scale, group_size, k)
    z_full = None if offset is None else expand_groups(offset, group_size, k)
    codes = encode(w.detach(), s_full.detach(), None if z_full is None else z_full.detach(), level_set)
    q = s_full * unit_values(codes, level_set).to(s_full.dtype)
    if z_full is not None:
        q = q + z_full
    return q + (w - w.detach())
