"""Float weight ↔ packed weight: the pure functions every quantiser (load, calibration, QAT, LoRA merge) ends in."""

import warnings

import torch

from .groups import expand_groups, group_absmax, num_groups
from .level_set import LevelSet
from .levels import dequantize_codes, encode
from .packing import pack, unpack
from .scale_search import FP16_MAX, search_scales

FP16_TINY = 2.0**-24  # the smallest positive float16 (a subnormal): smaller scales are stored as 0
STORE_DTYPE = torch.float16  # scales and offsets on disk and in memory


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raises if ``w`` has NaN or Inf: quantising them would silently corrupt a whole group."""
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"Layer {name or '<unnamed>'} has {bad} NaN/Inf weight value(s); PoT cannot quantise them. "
            "Fix or re-export the checkpoint (or add the layer to modules_to_not_convert)."
        )


def check_range(w: torch.Tensor, level_set: LevelSet, name: str) -> None:
    """Raises when a group's range needs a scale or offset beyond float16 (the format cannot hold it)."""
    absmax = w.abs().amax().item() if w.numel() else 0.0
    needed = absmax / level_set.max_abs if not level_set.offset else absmax
    if level_set.offset:
        needed = max(needed, 2 * absmax / (level_set.levels[-1] - level_set.levels[0]))
    if needed > FP16_MAX:
        raise ValueError(
            f"Layer {name or '<unnamed>'} has a weight of magnitude {absmax:.6g}, which needs a scale of "
            f"{needed:.6g}, beyond float16's {FP16_MAX:g} (the format stores scales as float16). Keep the layer in "
            "float (modules_to_not_convert) or rescale it."
        )


def warn_flushed(w: torch.Tensor, scale: torch.Tensor, group_size: int, name: str) -> None:
    """Warns when groups with non-zero weights got a zero scale: their weights are below float16's range."""
    flushed = (scale == 0) & (group_absmax(w, group_size) > 0)
    if flushed.any():
        warnings.warn(
            f"Layer {name or '<unnamed>'}: {int(flushed.sum())} group(s) hold only weights too small for a float16 "
            f"scale (< {FP16_TINY:.3g} per level) and are stored as 0.",
            RuntimeWarning,
            stacklevel=3,
        )


def quantize_weight(
    w: torch.Tensor,
    level_set: LevelSet,
    group_size: int,
    grid_points: int | None = None,
    refine_steps: int | None = None,
    name: str = "",
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float ``[N, K]`` → (packed ``uint8 [N, ceil(K/8)·bits]``, ``float16 [N, G]`` scales, offsets or `None`).

    Args:
        w (`torch.Tensor`): the float weight, rows are output features.
        level_set (`LevelSet`): what codes mean.
        group_size (`int`): input columns per scale.
        grid_points, refine_steps: the calibration-free search (see ``scale_search.search_scales``).
        name (`str`): the layer's name, for error messages.
        scale, offset (`torch.Tensor`, *optional*): ``[N, G]`` given (calibration, QAT); searched when `None`.
        importance (`torch.Tensor`, *optional*): ``[K]`` column weights of the search's error.

    Raises:
        ValueError: NaN/Inf weights, values beyond float16 scales, or given scales/offsets of the wrong shape or
            not finite and non-negative.
    """
    check_finite(w, name)
    w = w.float()
    g = num_groups(w.shape[1], group_size)
    if scale is None:
        check_range(w, level_set, name)
        scale, offset = search_scales(w, level_set, group_size, grid_points, importance, refine_steps)
    scale = _stored(scale, (w.shape[0], g), "scale", name, non_negative=True)
    if level_set.offset:
        if offset is None:
            raise ValueError(f"Layer {name or '<unnamed>'}: level set {level_set.id} needs offsets.")
        offset = _stored(offset, (w.shape[0], g), "offset", name, non_negative=False)
    else:
        offset = None
    warn_flushed(w, scale.float(), group_size, name)
    k = w.shape[1]
    z = None if offset is None else expand_groups(offset.float(), group_size, k)
    codes = encode(w, expand_groups(scale.float(), group_size, k), z, level_set)
    return pack(codes, level_set.bits), scale, offset


def _stored(t: torch.Tensor, shape, what: str, name: str, non_negative: bool) -> torch.Tensor:
    """``t`` as the stored float16, checked: shape, finite (after rounding), sign."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"Layer {name or '<unnamed>'}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)}.")
    out = t.detach().to(STORE_DTYPE)
    if not torch.isfinite(out).all():
        raise ValueError(
            f"Layer {name or '<unnamed>'}: a {what} is NaN/Inf or beyond float16's {FP16_MAX:g}; keep the layer in "
            "float (modules_to_not_convert)."
        )
    if non_negative and (out < 0).any():
        raise ValueError(f"Layer {name or '<unnamed>'}: {what}s must be non-negative.")
    return out


def dequantize_weight(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    level_set: LevelSet,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decodes a packed weight ``[N, bytes]`` with scales (and offsets) ``[N, G]`` to ``[N, K]`` in ``dtype``."""
    codes = unpack(packed, level_set.bits, in_features)
    return dequantize_codes(codes, scale, offset, level_set, group_size).to(dtype)
