"""Calibration-free scales (and offsets): PoTPTQ step 1 for any level set, plus least-squares refinement.

Per group, candidates ``α ∈ [alpha_min, 1]`` shrink the range the grid spans (symmetric sets: ``s = α·max|w| /
max|L|``; sets with an offset: the grid spans ``α·[min w, max w]``); each candidate's (optionally importance-
weighted) squared error is measured with the nearest-level rule, coarse to fine, and the best kept. Then
``refine_steps`` rounds of alternating least squares: with the codes fixed, the error is quadratic in ``s`` (and
``z``), so the optimum is closed-form; codes are re-chosen, and a group keeps the new scale only if its error fell.

**Exact zero.** With ``exact_zero`` (the default) an offset is always ``z = −s·L[j]`` for some level ``j``, so that
level decodes to zero (up to the float16 rounding of ``z``): the grid is shifted by whole levels, like the integer
zero point of uniform asymmetric quantisation, and the least squares solve for ``s`` with ``L[j]`` fixed. Measured
on SmolLM2 at 3 bits (docs/levels.md): a free float offset that puts no level on zero pushes every near-zero weight
of a group the same way, a correlated error that tripled the perplexity.

Rows are processed in chunks that stay in cache across all candidates (memory-bound element-wise work).
"""

import torch

from .groups import group_view
from .level_set import LevelSet
from .levels import nearest_level_index, nearest_levels

FP16_MAX = 65504.0
CHUNK_ELEMENTS = 1 << 16  # weights per chunk: 256 KiB of float32, cache-resident across candidates


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Rounds to the stored float16 (in float32) so codes are chosen against what is saved."""
    return scale.to(torch.float16).float()


class _Chunk:
    """One chunk of groups: weights ``x`` ``[n, G, g]``, column weights ``imp`` ``[G, g]`` (0 on padding)."""

    def __init__(self, x, imp, level_set: LevelSet, exact_zero: bool):
        self.x, self.imp, self.ls, self.exact_zero = x, imp, level_set, exact_zero

    def error(self, s, z):
        """Per-group weighted squared error ``[n, G]`` of the grid ``(s, z)`` (``z`` may be ``None``)."""
        q = self.quantized(s, z)
        return ((self.x - q).square_() * self.imp).sum(-1)

    def quantized(self, s, z):
        s3 = s[..., None]
        safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
        r = self.x if z is None else self.x - z[..., None]
        q = nearest_levels(r / safe, self.ls) * s3
        return q if z is None else q + z[..., None]

    def least_squares(self, s, z):
        """Closed-form ``(s, z)`` for the codes the grid ``(s, z)`` gives; ``(None, None)`` where degenerate."""
        s3 = s[..., None]
        safe = torch.where(s3 > 0, s3, torch.ones_like(s3))
        r = self.x if z is None else self.x - z[..., None]
        lv = nearest_levels(r / safe, self.ls)  # [n, G, g] unit levels of the current codes
        a = (self.imp * lv * lv).sum(-1)
        d = (self.imp * lv * self.x).sum(-1)
        if z is None:
            return torch.where(a > 0, d / a.clamp_min(1e-30), s), None
        if self.exact_zero:
            # z = −s·L0 with L0 fixed in units of s: w ≈ s·(L − L0), a one-dimensional least squares in s.
            l0 = -z / safe[..., 0]
            shifted = lv - l0[..., None]
            a0, d0 = (self.imp * shifted * shifted).sum(-1), (self.imp * shifted * self.x).sum(-1)
            s_new = torch.where(a0 > 0, d0 / a0.clamp_min(1e-30), s)
            return s_new, -s_new * l0
        b, c, e = (self.imp * lv).sum(-1), self.imp.sum(-1).expand_as(a), (self.imp * self.x).sum(-1)
        det = a * c - b * b
        ok = det > 1e-12 * (a * c).clamp_min(1e-30)
        det = torch.where(ok, det, torch.ones_like(det))
        s_new = torch.where(ok, (c * d - b * e) / det, s)
        z_new = torch.where(ok, (a * e - b * d) / det, z)
        return s_new, z_new


def zero_offset(s: torch.Tensor, z: torch.Tensor, level_set: LevelSet) -> torch.Tensor:
    """The offset nearest ``z`` that puts a level on zero: ``−s·L[j]`` for the level ``L[j]`` nearest ``−z/s``
    (float16-representable; the level then decodes to zero up to that rounding)."""
    lv = torch.tensor(level_set.levels, dtype=s.dtype, device=s.device)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return round_scale(-s * lv[nearest_level_index(-z / safe, level_set)])


def _candidate(lo, hi, absmax, alpha, level_set: LevelSet, exact_zero: bool):
    """The grid ``(s, z)`` (float16-representable) of shrink factor ``alpha`` ``[n, G]``."""
    if not level_set.offset:
        return round_scale(alpha * absmax / level_set.max_abs), None
    lmin, lmax = level_set.levels[0], level_set.levels[-1]
    s = round_scale(alpha * (hi - lo) / (lmax - lmin))
    z = round_scale(alpha * lo - s * lmin)
    return s, (zero_offset(s, z, level_set) if exact_zero else z)


def _keep(state, cand, err):
    """Per group, the better of the best so far and the candidate: ``(err, s, z, alpha)``."""
    if state is None:
        return (err, *cand)
    better = err < state[0]
    pick = lambda new, old: None if new is None else torch.where(better, new, old)
    return tuple(pick(n, o) for n, o in zip((err, *cand), state))


def _search_chunk(chunk: _Chunk, lo, hi, absmax, grid_points, alpha_min, refine_steps):
    ls, exact_zero = chunk.ls, chunk.exact_zero
    state = None
    coarse = max(2, grid_points // 4) if grid_points > 1 else 1
    alphas = torch.linspace(alpha_min, 1.0, coarse).tolist() if coarse > 1 else [1.0]
    for a in alphas:
        s, z = _candidate(lo, hi, absmax, torch.full_like(absmax, a), ls, exact_zero)
        state = _keep(state, (s, z, torch.full_like(absmax, a)), chunk.error(s, z))
    if grid_points > 1:
        step = (1.0 - alpha_min) / (coarse - 1)
        for off in torch.linspace(-step, step, coarse + 2)[1:-1].tolist():  # strictly between the neighbours
            a = (state[3] + off).clamp(alpha_min, 1.0)
            s, z = _candidate(lo, hi, absmax, a, ls, exact_zero)
            state = _keep(state, (s, z, a), chunk.error(s, z))
    for _ in range(refine_steps):
        s, z = chunk.least_squares(state[1], state[2])
        s = round_scale(s.clamp(0.0, FP16_MAX))
        z = None if z is None else round_scale(z.clamp(-FP16_MAX, FP16_MAX))
        if z is not None and exact_zero:
            z = zero_offset(s, z, ls)
        state = _keep(state, (s, z, state[3]), torch.where(s > 0, chunk.error(s, z), torch.inf))
    return state[1], state[2]


@torch.no_grad()
def default_search(level_set: LevelSet) -> tuple[int, int]:
    """The measured best calibration-free ``(grid_points, refine_steps)`` for ``level_set`` (docs/levels.md).

    For two-term tables with a per-group offset (``sp2``, ``int``) the closed form (min/max, a level snapped onto
    zero) measured best on SmolLM2 and Gemma 3: the ``α`` search and least squares lower the weight MSE but raised
    perplexity. Single-term tables (geometric gaps; ``pot``) and tables without an offset keep the 16-point search
    plus 2 least-squares rounds, which measured best for them.
    """
    return (1, 0) if level_set.offset and level_set.max_terms > 1 else (16, 2)


def search_scales(
    w: torch.Tensor,
    level_set: LevelSet,
    group_size: int,
    grid_points: int | None = None,
    importance: torch.Tensor | None = None,
    refine_steps: int | None = None,
    alpha_min: float = 0.5,
    exact_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scales (and offsets) ``[N, G]``, float32 values exactly representable in float16.

    Args:
        w (`torch.Tensor`): ``[N, K]`` float weight (finite), rows are output features.
        level_set (`LevelSet`): the levels; an offset is searched when ``level_set.offset``.
        group_size (`int`): input columns per scale.
        grid_points (`int`, *optional*): candidates for ``α`` (coarse to fine); 1 keeps the closed form
            (``α = 1``); `None`: the level set's default (``default_search``).
        importance (`torch.Tensor`, *optional*): ``[K]`` non-negative column weights of the error (e.g. mean
            squared activations).
        refine_steps (`int`, *optional*): rounds of alternating least squares after the search (0: none); `None`:
            the level set's default.
        alpha_min (`float`): smallest ``α`` tried.
        exact_zero (`bool`): offsets put a level on zero (see the module docstring); `False`: free offsets.

    Returns:
        ``(scale, offset)``; ``offset`` is `None` for level sets without one.
    """
    defaults = default_search(level_set)
    grid_points = defaults[0] if grid_points is None else grid_points
    refine_steps = defaults[1] if refine_steps is None else refine_steps
    n, k = w.shape
    x = group_view(w.float(), group_size)  # [N, G, g] zero padded
    cols = torch.ones(1, k, device=w.device) if importance is None else importance.float().reshape(1, k)
    imp = group_view(cols, group_size)[0]  # [G, g], 0 on the padding of a partial last group
    valid = group_view(torch.ones(1, k, device=w.device), group_size)[0] > 0
    big = torch.finfo(torch.float32).max
    lo_all = torch.where(valid, x, big).amin(-1).clamp_max(0.0) if level_set.offset else None
    hi_all = torch.where(valid, x, -big).amax(-1).clamp_min(0.0) if level_set.offset else None
    absmax_all = x.abs().amax(-1)
    scale = torch.empty(n, x.shape[1], device=w.device)
    offset = torch.empty_like(scale) if level_set.offset else None
    rows = max(1, CHUNK_ELEMENTS // max(1, x.shape[1] * x.shape[2]))
    for r0 in range(0, n, rows):
        sl = slice(r0, r0 + rows)
        chunk = _Chunk(x[sl], imp, level_set, exact_zero)
        lo = None if lo_all is None else lo_all[sl]
        hi = None if hi_all is None else hi_all[sl]
        s, z = _search_chunk(chunk, lo, hi, absmax_all[sl], grid_points, alpha_min, refine_steps)
        scale[sl] = s
        if offset is not None:
            offset[sl] = z
    return scale, offset


def weight_error(w, scale, offset, level_set: LevelSet, group_size: int, importance=None) -> torch.Tensor:
    """Per-group (weighted) squared error ``[N, G]`` of quantising ``w`` ``[N, K]`` with ``scale`` / ``offset``."""
    k = w.shape[-1]
    x = group_view(w.float(), group_size)
    cols = torch.ones(1, k, device=w.device) if importance is None else importance.float().reshape(1, k)
    return _Chunk(x, group_view(cols, group_size)[0], level_set, False).error(scale.float(), offset)
