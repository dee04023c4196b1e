"""The QAT fake-quantiser as one autograd function, computed in cache-sized chunks of rows.

Same values and gradients as :func:`optimum_pot.format.levels.fake_quantize` (tested bit for bit): codes of the
nearest level of ``(w − z) / s`` from detached values, ``q = s · L[code] (+ z)``, a straight-through gradient for
``w`` and true gradients ``Σ_group grad · L[code]`` for ``s`` and ``Σ_group grad`` for ``z``. The generic version
builds ``[N, K]`` expansions of the scales and an autograd graph of a dozen element-wise ops per layer; on
SmolLM2-135M that made a QAT step ~3-4× a float step on CPU. Here each chunk of rows stays in cache through all
its passes, and backward keeps only the ``uint8`` level index of each weight.
"""

import torch

from ..format.groups import group_view, num_groups
from ..format.level_set import LevelSet
from ..format.levels import nearest_level_index

CHUNK_ELEMENTS = 1 << 16  # weights per chunk: 256 KiB of float32, cache-resident across the chunk's passes


def _rows_per_chunk(groups: int, group_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // (groups * group_size))


class PoTFakeQuantize(torch.autograd.Function):
    """``q = s · L[nearest(w)] (+ z)`` ``[N, K]`` with straight-through ``w``; see the module docstring."""

    @staticmethod
    def forward(ctx, w, scale, offset, group_size: int, level_set: LevelSet):
        n, k = w.shape
        groups = num_groups(k, group_size)
        if scale.shape != (n, groups):
            raise ValueError(f"scale has shape {tuple(scale.shape)}; {n} rows of {k} columns in groups of "
                             f"{group_size} need ({n}, {groups}).")  # fmt: skip
        x = group_view(w.detach().float(), group_size)  # [N, G, g], zero padded
        s3 = scale.detach().float()[..., None]  # [N, G, 1]
        z3 = None if offset is None else offset.detach().float()[..., None]
        values = torch.tensor(level_set.levels, dtype=torch.float32, device=w.device)
        q = torch.empty_like(x)
        index = torch.empty(x.shape, dtype=torch.uint8, device=w.device)  # level index, for backward
        rows = _rows_per_chunk(groups, group_size)
        for r0 in range(0, n, rows):
            sl = slice(r0, r0 + rows)
            r = x[sl] - z3[sl] if z3 is not None else x[sl].clone()
            idx = nearest_level_index(r.div_(s3[sl]), level_set)
            index[sl] = idx
            torch.mul(s3[sl], values[idx], out=q[sl])
            if z3 is not None:
                q[sl] += z3[sl]
        ctx.save_for_backward(index)
        ctx.meta = (k, group_size, values, offset is not None)
        return q.reshape(n, -1)[:, :k]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        k, group_size, values, has_offset = ctx.meta
        n, groups = index.shape[0], index.shape[1]
        grad_w = grad if ctx.needs_input_grad[0] else None  # straight through
        grad_s = grad_z = None
        if ctx.needs_input_grad[1] or (has_offset and ctx.needs_input_grad[2]):
            g = group_view(grad.float(), group_size)  # [N, G, g], zero on the padding
            grad_s = torch.empty(n, groups, device=grad.device)
            grad_z = torch.empty(n, groups, device=grad.device) if has_offset else None
            rows = _rows_per_chunk(groups, group_size)
            for r0 in range(0, n, rows):
                sl = slice(r0, r0 + rows)
                grad_s[sl] = (g[sl] * values[index[sl].to(torch.int64)]).sum(-1)
                if grad_z is not None:
                    grad_z[sl] = g[sl].sum(-1)
        return grad_w, grad_s, grad_z, None, None


def fake_quantize_ste(w, scale, offset, group_size: int, level_set: LevelSet) -> torch.Tensor:
    """:class:`PoTFakeQuantize` applied to ``w`` ``[N, K]``, ``scale`` / ``offset`` ``[N, G]``."""
    return PoTFakeQuantize.apply(w, scale, offset, group_size, level_set)
