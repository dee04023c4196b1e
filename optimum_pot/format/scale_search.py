"""PoTPTQ step 1: data-free scale initialisation.

Closed form: the group maximum is the largest grid magnitude. Refinement: per group, a grid search over
``s = α · max|w|`` for ``α ∈ [alpha_min, 1]`` keeps the ``α`` with the smallest (optionally importance-weighted)
squared weight error. One octave of ``α`` is enough: doubling ``s`` only relabels exponents.
"""

import torch

from .levels import encode, expand_groups, group_view, max_nonzero_exponent, unit_values

FP16_MAX = 65504.0


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Rounds scales to the stored float16 so codes are chosen against the scale that is saved."""
    return scale.to(torch.float16).float()


def weight_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    bits: int,
    zero_level: bool,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group squared error of quantising ``w`` ``[N, K]`` with ``scale`` ``[N, G]``: ``[N, G]``.

    Args:
        importance (`torch.Tensor`, *optional*): ``[K]`` non-negative column weights (e.g. mean squared
            activations); the error of column ``k`` is multiplied by ``importance[k]``.
    """
    k = w.shape[-1]
    s_full = expand_groups(scale, group_size, k)
    q = s_full * unit_values(encode(w, s_full, bits, zero_level), bits, zero_level)
    err = (w.float() - q) ** 2
    if importance is not None:
        err = err * importance.float()
    return group_view(err, group_size).sum(dim=-1)  # zero padding adds no error


def _candidate_error(
    a: torch.Tensor, log_a: torch.Tensor, s: torch.Tensor, bits: int, zero_level: bool, col_weight: torch.Tensor
) -> torch.Tensor:
    """Per-group squared error ``[N, G]`` of magnitudes ``a`` ``[N, G, g]`` on the grid of scales ``s`` ``[N, G]``.

    The same rounding rule as :func:`~optimum_pot.format.levels.nearest_exponent`, rewritten with the logarithm of
    ``|w|`` computed once for all candidates: ``e = floor(log2(1.5·s) − log2|w|)``. The sign always matches, so the
    error only depends on magnitudes.
    """
    e_max = max_nonzero_exponent(bits, zero_level)
    s3 = s.unsqueeze(-1)  # [N, G, 1]
    e = torch.floor(torch.log2(s3 * 1.5) - log_a).clamp_(0, e_max)
    q = s3 * torch.exp2(-e)
    if zero_level:
        q = torch.where(a < s3 * (0.5 * 2.0**-e_max), 0.0, q)
    return ((a - q) ** 2 * col_weight).sum(dim=-1)


def search_scales(
    w: torch.Tensor,
    group_size: int,
    bits: int,
    zero_level: bool,
    grid_points: int = 32,
    alpha_min: float = 0.5,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-group scales ``[N, G]`` (float32 values exactly representable in float16) minimising weight error.

    Args:
        w (`torch.Tensor`): ``[N, K]`` float weight, rows are output features.
        group_size (`int`): input columns per scale.
        bits (`int`): 2, 3 or 4.
        zero_level (`bool`): whether the last exponent code means zero.
        grid_points (`int`): candidates for ``α``; 1 keeps the closed form ``s = max|w|``.
        alpha_min (`float`): smallest ``α`` tried.
        importance (`torch.Tensor`, *optional*): ``[K]`` column weights for the error.
    """
    k = w.shape[-1]
    a = group_view(w.float().abs(), group_size)  # [N, G, g], zero padded
    absmax = a.amax(dim=-1)
    best = round_scale(absmax)
    if grid_points <= 1:
        return best
    # Column weights [1, G, g]: the importance, and 0 on the padding of a partial last group.
    cols = torch.ones(1, k, device=w.device) if importance is None else importance.float().reshape(1, k)
    col_weight = group_view(cols, group_size)
    log_a = torch.log2(a)  # -inf for zeros: they take the smallest level (or zero)
    best_err = _candidate_error(a, log_a, best, bits, zero_level, col_weight)
    for alpha in torch.linspace(alpha_min, 1.0, grid_points)[:-1].tolist():
        cand = round_scale(absmax * alpha)
        err = _candidate_error(a, log_a, cand, bits, zero_level, col_weight)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
    return best
