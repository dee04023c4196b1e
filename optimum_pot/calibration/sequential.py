"""Error-feedback rounding of one decoder block, layer by layer ("true sequential").

The block is copied once in float32 with each ``PoTLinear`` replaced by a :class:`WorkLinear` holding its float
weight. Its layers are split into **stages**: consecutive layers that read the same input tensor (Llama's q/k/v, its
gate/up; GPT-2's fused ``c_attn``), found by watching one forward pass. For each stage in order, the block runs on
the cached inputs only up to that stage (a hook stops the forward there) to collect the input Hessian, which is
then the same for all the stage's layers; the stage is rounded (``gptq.py``) and its rounded weights replace the float
ones, so the next stage's inputs already carry this stage's rounding error (the next stage compensates for it).
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..format.scale_search import search_scales
from ..format.weights import quantize_weight
from ..nn.pot_linear import PoTLinear
from .blocks import BlockInputs, block_output
from .gptq import Rounded, gptq_round, single_thread
from .hessian import Hessian


class _Stop(Exception):
    """Raised by a hook once a stage's inputs are seen: the rest of the block is not needed."""


class WorkLinear(nn.Module):
    """Float32 stand-in of a ``PoTLinear`` in the working copy of a block: its float weight, then its rounded one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def pot_modules(block: nn.Module) -> list[tuple[str, PoTLinear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, PoTLinear)]


def work_block(block: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A float32 copy of ``block`` whose ``PoTLinear`` layers are :class:`WorkLinear` with ``weights[name]``."""
    mods = pot_modules(block)
    # The PoT layers are replaced anyway: keep deepcopy from copying their packed codes and held float weights.
    memo = {id(m): nn.Identity() for _, m in mods}
    out = copy.deepcopy(block, memo).float()
    for p in out.parameters():
        p.requires_grad_(False)
    for name, m in mods:
        out.set_submodule(name, WorkLinear(weights[name], m.bias))
    return out


@torch.no_grad()
def find_stages(block: nn.Module, names: list[str], x: torch.Tensor, inputs: BlockInputs) -> list[list[str]]:
    """Groups ``names`` into stages: runs of consecutive calls that read the same input tensor (one sample ``x``).

    Layers the forward never calls come last, one stage each (they get no Hessian and are rounded to nearest).
    """
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
             for n in names]  # fmt: skip
    try:
        block_output(block, x, inputs)
    finally:
        for h in hooks:
            h.remove()
    stages, last, seen = [], None, set()
    for name, t in calls:
        if name in seen:  # a layer called twice: its first input decides
            continue
        seen.add(name)
        if last is not None and t is last:
            stages[-1].append(name)
        else:
            stages.append([name])
        last = t
    return stages + [[n] for n in names if n not in seen]


@torch.no_grad()
def stage_hessians(block: nn.Module, firsts: list[str], hidden: list, inputs: BlockInputs, stop: bool):
    """``H`` of the inputs of each layer in ``firsts`` over all cached samples.

    With ``stop`` (one layer: true-sequential), each sample runs only as far as that layer and no outputs are
    returned; without, the whole block runs and its outputs are returned too: ``({first: Hessian}, outputs)``.
    """
    acc: dict[str, Hessian] = {}

    def hook(module, args, first):
        x = args[0]
        if first not in acc:
            acc[first] = Hessian(x.shape[-1], device=x.device)
        acc[first].add(x)
        if stop:
            raise _Stop

    handles = [block.get_submodule(f).register_forward_pre_hook(lambda m, a, f=f: hook(m, a, f)) for f in firsts]
    outputs = []
    try:
        for x in hidden:
            try:
                outputs.append(block_output(block, x.float(), inputs).to(x.device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return acc, (None if stop else outputs)


def _static_grid(mods, w_cat, ls, hess: Hessian, cfg):
    """Static scales/offsets of the stacked rows: the stored calibration-free ones, or an importance-weighted search."""
    stored_ok = all(m.level_set == ls for m in mods) and not cfg.act_weighted_init
    if stored_ok:
        scale = torch.cat([m.weight_scale.detach().float() for m in mods])
        offset = None if not ls.offset else torch.cat([m.weight_offset.detach().float() for m in mods])
        return scale, offset
    importance = hess.importance() if cfg.act_weighted_init and hess is not None else None
    grid, steps = calibrated_search(cfg)
    return search_scales(w_cat, ls, mods[0].group_size, grid, importance, steps)


def passthrough(block, inputs: BlockInputs, hidden) -> tuple[list, dict]:
    """A block without PoT layers: nothing to calibrate, its outputs are the next block's inputs."""
    return [block_output(block, x, inputs).float().to(x.device) for x in hidden], {"before": 0.0, "after": 0.0}


def float_weights(name: str, mods, weights) -> dict:
    """``{layer name in the block: float32 target weight}`` of ``mods`` (``pot_modules``), on their device."""
    device = mods[0][1].weight.device
    return {n: weights.get(f"{name}.{n}", m).to(device) for n, m in mods}


def calibrated_search(cfg) -> tuple[int, int]:
    """``(grid_points, refine_steps)`` of the grid that error feedback rounds onto: the config's when set, else the
    16-point activation-weighted search + 2 least-squares rounds for every level set. Unlike round-to-nearest (where
    the closed form measured best for two-term offset sets), GPTQ gains from the fitted grid: SmolLM2 3-bit sp2,
    16 calibration windows, 41.58 perplexity with the closed-form grid vs 34.39 with the search (docs/calibration.md).
    """
    return (16 if cfg.grid_points is None else cfg.grid_points, 2 if cfg.refine_steps is None else cfg.refine_steps)


@torch.no_grad()
def round_stage(stage: list[tuple[str, PoTLinear]], weights: dict, hess: Hessian | None, cfg, prefix: str) -> dict:
    """Rounds the layers of one stage (same input); layers with the same level set are stacked row-wise and rounded
    together (GPTQ rows are independent given ``H``). Returns ``{name: Rounded}``."""
    buckets: dict = {}
    for name, m in stage:
        buckets.setdefault((m.level_set, m.group_size), []).append((name, m))
    out = {}
    for (ls, gs), members in buckets.items():
        names, mods = [n for n, _ in members], [m for _, m in members]
        w_cat = torch.cat([weights[n] for n in names])  # [ΣN, K]
        static = cfg.group_scales == "static"
        k = w_cat.shape[1]
        h = hess.h if hess is not None else torch.zeros(k, k)  # no inputs seen: the zero Hessian rounds to nearest
        label = f"{prefix}.{'+'.join(names)}"
        with single_thread():
            scale, offset = _static_grid(mods, w_cat, ls, hess, cfg) if static else (None, None)
            r = gptq_round(w_cat, h, ls, gs, scale, offset, cfg.damp_percent, cfg.act_order, cfg.gptq_block_size,
                           *calibrated_search(cfg), cfg.act_weighted_init, label)  # fmt: skip
        rows = 0
        for name, m in members:
            sl = slice(rows, rows + m.out_features)
            off = None if r.offset is None else r.offset[sl]
            out[name] = Rounded(r.weight[sl], r.scale[sl], off, r.error, r.feedback)
            rows += m.out_features
    return out


def store(module: PoTLinear, rounded: Rounded, name: str) -> None:
    """Packs a rounded weight into its ``PoTLinear`` (codes re-derived by the nearest-level rule: the same grid)."""
    packed, scale, offset = quantize_weight(rounded.weight, module.level_set, module.group_size, name=name,
                                            scale=rounded.scale, offset=rounded.offset)  # fmt: skip
    module.set_quantized(packed, scale, offset)


# Samples on which each block's output error is measured before and after (a cost of 2·ERROR_SAMPLES forwards).
ERROR_SAMPLES = 4


def relative_error(outputs: list, targets: list) -> float:
    """``Σ‖out − y‖² / Σ‖y‖²`` over pairs of outputs and targets."""
    num = sum((o.float() - y.float()).pow(2).sum().item() for o, y in zip(outputs, targets))
    return num / max(sum(y.float().pow(2).sum().item() for y in targets), 1e-30)


@torch.no_grad()
def output_error(block: nn.Module, inputs: BlockInputs, hidden: list, targets: list) -> float:
    """``Σ‖block(x) − y‖² / Σ‖y‖²`` over the first ``len(targets)`` samples."""
    return relative_error([block_output(block, x.float(), inputs) for x in hidden[: len(targets)]], targets)


def _swap(block: nn.Module, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sets the weights of the named ``WorkLinear`` layers; returns the ones they had."""
    old = {}
    for n, w in new.items():
        layer = block.get_submodule(n)
        old[n], layer.weight = layer.weight, w
    return old


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gptq_block(name, block, weights, inputs: BlockInputs, hidden: list, cfg, progress) -> tuple[list, dict]:
    """Rounds one block's layers with error feedback, stage by stage; returns the next block's inputs and a report.

    With ``refines_scales(cfg)``, PoTPTQ step 2 then learns each group's scale residual with the codes fixed.
    """
    from .options import refines_scales
    from .refine import refine_rounded
    from .weights import FloatWeights

    mods = pot_modules(block)
    with torch.no_grad():
        if not mods:
            return passthrough(block, inputs, hidden)
        w = float_weights(name, mods, weights)
        wb = work_block(block, w)
        step2 = refines_scales(cfg)
        k = min(ERROR_SAMPLES, len(hidden))
        stages = find_stages(wb, [n for n, _ in mods], hidden[0].float(), inputs)
        if cfg.true_sequential:
            targets = [block_output(wb, x.float(), inputs).to(x.device) for x in (hidden if step2 else hidden[:k])]
        else:  # one float pass: every stage's Hessian (inputs from float layers) and all the targets
            hessians, targets = stage_hessians(wb, [s[0] for s in stages], hidden, inputs, stop=False)
        floats = _swap(wb, {n: m.dequantize_weight() for n, m in mods})  # the calibration-free quantisation
        before = output_error(wb, inputs, hidden[:k], targets[:k])
        _swap(wb, floats)
        rounded, spent = {}, 0.0
        for stage in stages:
            if cfg.true_sequential:  # inputs through the already-rounded stages of this block
                hessians = stage_hessians(wb, stage[:1], hidden, inputs, stop=True)[0]
            hess = hessians.get(stage[0])
            t0 = time.perf_counter()
            res = round_stage([(n, block.get_submodule(n)) for n in stage], w, hess, cfg, name)
            spent += time.perf_counter() - t0
            _swap(wb, {n: r.weight for n, r in res.items()})
            rounded.update(res)
    row = {"layer_error": {n: r.error for n, r in rounded.items()}, "rounding_seconds": spent}
    if step2:
        row["loss_per_epoch"] = refine_rounded(
            wb, rounded, dict(mods), inputs, hidden, targets, cfg, f"step 2 {name}", progress
        )
    with torch.no_grad():
        for n, m in mods:
            store(m, rounded[n], f"{name}.{n}")
            FloatWeights.release(m)
        nxt = [block_output(wb, x.float(), inputs).to(x.device) for x in hidden]
        after = relative_error(nxt[:k], targets[:k])
    row.update(before=before, after=after, float_block_mb=nbytes([*wb.parameters(), *wb.buffers()]) / 2**20,
               activations_mb=nbytes([*hidden, *nxt, *targets]) / 2**20)  # fmt: skip
    return nxt, row
