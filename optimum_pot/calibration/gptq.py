"""Error-feedback rounding (GPTQ / OBQ) onto any level set of the format.

Columns of ``W`` ``[N, K]`` are rounded one at a time to the format's nearest level (``format/levels.py``); the
rounding error of column ``i`` is pushed onto the columns not yet rounded through the inverse Hessian of the layer's
inputs, ``W[:, j] -= e_i · U[i, j] / U[i, i]`` (``U`` the upper Cholesky factor of ``H⁻¹``), which minimises the
layer's output error ``tr(Δ H Δᵀ)`` given the columns already fixed. Updates are applied lazily, ``block_size``
columns at a time (one matrix product per block instead of one rank-1 update per column).

Group scales (and offsets) are either given (``static``: the calibration-free search, run before) or re-searched when
the first column of a group is reached (``dynamic``: on the group's weights as error feedback has updated them).
With ``act_order`` the columns are processed by decreasing ``H_ii`` (the inputs with the most energy first, while
there are many columns left to absorb their error); groups stay contiguous runs of input columns in the stored format,
so ordering only changes when each column is rounded, not which scale it uses.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..format.groups import num_groups
from ..format.level_set import LevelSet
from ..format.levels import nearest_level_index, nearest_levels, unit_ratio
from ..format.scale_search import search_scales
from .hessian import inverse_cholesky


@contextmanager
def single_thread():
    """Runs the block in one intra-op thread: the column loop is thousands of small vector operations, which a
    second thread only slows down (measured 1.4x slower on an idle-ish machine and up to 40x on a loaded one, where
    every operation waits for a descheduled worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Rounded:
    """Result of rounding one weight.

    Attributes:
        weight (`torch.Tensor`): ``[N, K]`` float32, every value exactly ``s·L + z`` of its group's grid.
        scale (`torch.Tensor`): ``[N, G]`` float32 values representable in float16.
        offset (`torch.Tensor`, *optional*): ``[N, G]``, for level sets with an offset.
        error (`float`): relative output error ``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` on the calibration inputs.
        feedback (`bool`): whether error feedback ran (`False`: the Hessian was unusable, rounded to nearest).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    error: float
    feedback: bool = True


def on_grid(col: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, level_set: LevelSet) -> torch.Tensor:
    """Nearest grid value ``s·L + z`` of each entry of ``col`` (any shape; ``scale``/``offset`` broadcast)."""
    q = nearest_levels(unit_ratio(col, scale, offset), level_set) * scale
    return q if offset is None else q + offset


def relative_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)`` with ``Δ = q − w``: the layer's relative output error on the calibration inputs."""
    d = q - w
    den = ((w @ h) * w).sum().item()
    return ((d @ h) * d).sum().item() / max(den, 1e-30)


class _Groups:
    """Per-group scales/offsets, filled up front (static) or when a group's first column is reached (dynamic).

    Stored transposed (``[G, N]``, one contiguous row per group) with the reciprocal scale, so rounding one column
    is a handful of vector operations: the column loop runs ``K`` times per layer.
    """

    def __init__(self, w, level_set, group_size, scale, offset, search: dict):
        n, k = w.shape
        g = num_groups(k, group_size)
        self.ls, self.gs, self.search = level_set, group_size, search
        self.levels = torch.tensor(level_set.levels, dtype=torch.float32, device=w.device)
        self.scale_t = torch.zeros(g, n, device=w.device) if scale is None else scale.float().t().contiguous()
        self.offset_t = None
        if level_set.offset:
            self.offset_t = torch.zeros(g, n, device=w.device) if offset is None else offset.float().t().contiguous()
        self.inv_t = self._inverse(self.scale_t)
        self.done = [scale is not None] * g

    @staticmethod
    def _inverse(s):
        return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))

    def fit(self, group: int, current: torch.Tensor, importance: torch.Tensor | None) -> None:
        """Searches group ``group``'s scale on its ``current`` (error-updated) weights ``[N, g]``."""
        s, z = search_scales(current, self.ls, self.gs, self.search["grid_points"], importance,
                             self.search["refine_steps"])  # fmt: skip
        self.scale_t[group] = s[:, 0]
        self.inv_t[group] = self._inverse(s[:, 0])
        if self.offset_t is not None:
            self.offset_t[group] = z[:, 0]
        self.done[group] = True

    def round(self, col: torch.Tensor, group: int) -> torch.Tensor:
        """Nearest grid value of each entry of ``col`` ``[N]`` on group ``group``'s grid (a zero scale gives the
        level nearest zero, as ``levels.unit_ratio``)."""
        z = None if self.offset_t is None else self.offset_t[group]
        r = (col if z is None else col - z) * self.inv_t[group]
        q = self.levels[nearest_level_index(r, self.ls)] * self.scale_t[group]
        return q if z is None else q + z

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_t.t().contiguous()

    @property
    def offset(self) -> torch.Tensor | None:
        return None if self.offset_t is None else self.offset_t.t().contiguous()


@torch.no_grad()
def gptq_round(
    w: torch.Tensor,
    h: torch.Tensor,
    level_set: LevelSet,
    group_size: int,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    damp_percent: float = 0.01,
    act_order: bool = True,
    block_size: int = 32,
    grid_points: int | None = None,
    refine_steps: int | None = None,
    weighted_search: bool = False,
    name: str = "",
) -> Rounded:
    """Rounds ``w`` ``[N, K]`` onto ``level_set`` with error feedback through the input Hessian ``h`` ``[K, K]``.

    Args:
        w (`torch.Tensor`): float weight, rows are output features.
        h (`torch.Tensor`): ``Σ x xᵀ`` of the layer's calibration inputs (any positive multiple).
        level_set (`LevelSet`): the levels; codes are the nearest level of ``(w − z)/s``.
        group_size (`int`): input columns per scale.
        scale, offset (`torch.Tensor`, *optional*): ``[N, G]`` static grid (float16-representable); `None`:
            re-searched per group when its first column is reached.
        damp_percent (`float`): damping of ``H`` relative to ``mean(diag H)`` (> 0).
        act_order (`bool`): process columns by decreasing ``H_ii``.
        block_size (`int`): columns per lazy batch update.
        grid_points, refine_steps: the scale search of the dynamic mode (``format.scale_search``).
        weighted_search (`bool`): weight the dynamic search's error of each column by ``H_ii``.
        name (`str`): the layer's name, for warnings.
    """
    w = w.float()
    n, k = w.shape
    gs = min(group_size, k)
    groups = _Groups(w, level_set, gs, scale, offset, {"grid_points": grid_points, "refine_steps": refine_steps})
    importance = h.diagonal().clamp_min(0) if weighted_search else None
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    upper = inverse_cholesky(h[perm][:, perm], damp_percent, name)
    if upper is None:  # unusable Hessian: nearest rounding on the (searched) grid, never NaN
        return _nearest(w, h, groups, importance)
    work = w[:, perm].clone()  # [N, K] in processing order
    col_group = (perm // gs).tolist()
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(k)  # processing position of each original column
    out = torch.empty_like(work)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        block, err = work[:, i1:i2].clone(), torch.zeros(n, i2 - i1)
        u = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = col_group[i1 + i]
            if not groups.done[g]:
                cols = torch.arange(g * gs, min(g * gs + gs, k))
                current = _current(work, block, err, upper, pos[cols], i1, i)
                groups.fit(g, current, None if importance is None else importance[cols])
            col = block[:, i]
            q = groups.round(col, g)
            out[:, i1 + i] = q
            e = (col - q) / u[i, i]
            block[:, i:].addr_(e, u[i, i:], alpha=-1.0)
            err[:, i] = e
        work[:, i2:].addmm_(err, upper[i1:i2, i2:], alpha=-1.0)
    q = torch.empty_like(out)
    q[:, perm] = out
    return Rounded(q, groups.scale, groups.offset, relative_error(w, q, h))


def _current(work, block, err, upper, positions, i1, i):
    """Current values ``[N, g]`` of the columns at ``positions`` (none processed yet), with pending updates."""
    i2 = i1 + block.shape[1]
    out = torch.empty(work.shape[0], len(positions))
    for j, p in enumerate(positions.tolist()):
        if p < i2:
            out[:, j] = block[:, p - i1]
        else:  # its lazy update from this block's first i columns is still pending
            out[:, j] = work[:, p] - err[:, :i] @ upper[i1 : i1 + i, p]
    return out


def _nearest(w, h, groups: _Groups, importance) -> Rounded:
    k = w.shape[1]
    for g in range(groups.scale.shape[1]):
        if not groups.done[g]:
            cols = torch.arange(g * groups.gs, min(g * groups.gs + groups.gs, k))
            groups.fit(g, w[:, cols], None if importance is None else importance[cols])
    s = groups.scale.repeat_interleave(groups.gs, dim=1)[:, :k]
    z = None if groups.offset is None else groups.offset.repeat_interleave(groups.gs, dim=1)[:, :k]
    q = on_grid(w, s, z, groups.ls)
    return Rounded(q, groups.scale, groups.offset, relative_error(w, q, h), feedback=False)
