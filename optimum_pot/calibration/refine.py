"""PoTPTQ step 2 for one block: learn per-group scale residuals ``Γ`` (``ŝ = s·(1+Γ)``) on the block's output.

The loss is the block-output error against the float block, relative to the target's energy (so one ``λ`` and one
learning rate suit every block, whatever its activation scale), plus ``λ·mean(Γ²)``. Two forms:

* after nearest rounding (``FakeQuantLinear``): codes are re-derived from ``ŝ`` at every step (``fake_quantize``:
  detached codes, gradient to the scale);
* after error-feedback rounding (``FixedGridLinear``): the codes GPTQ chose are kept (re-deriving them from the float
  weight would undo its rounding) and ``Γ`` scales each group's grid, offset included: ``w = (1+Γ)·(s·L + z)``,
  so a level that sat exactly on zero stays there.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..format.groups import expand_groups
from ..format.levels import fake_quantize, nearest_levels, unit_ratio
from ..format.scale_search import round_scale, search_scales
from ..format.weights import quantize_weight
from ..nn.pot_linear import PoTLinear
from .blocks import BlockInputs, block_device, block_output
from .gptq import Rounded
from .sequential import (
    ERROR_SAMPLES,
    WorkLinear,
    calibrated_search,
    float_weights,
    nbytes,
    passthrough,
    pot_modules,
    relative_error,
)


class FakeQuantLinear(nn.Module):
    """Training stand-in for a ``PoTLinear``: float weight, frozen initial scale ``s`` and learned ``Γ``.

    Args:
        weight (`torch.Tensor`): float32 ``[N, K]``.
        scale (`torch.Tensor`): float32 ``[N, G]`` initial scale (PoTPTQ step 1).
        offset (`torch.Tensor`, *optional*): float32 ``[N, G]`` offsets (level sets with offsets; kept fixed).
        bias (`torch.Tensor`, *optional*): ``[N]``.
        module (`PoTLinear`): the layer it stands for (level set, group size).
    """

    def __init__(self, weight, scale, offset, bias, module: PoTLinear):
        super().__init__()
        self.level_set, self.group_size = module.level_set, module.group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.gamma = nn.Parameter(torch.zeros_like(scale))

    def refined_scale(self) -> torch.Tensor:
        """``ŝ = s·(1+Γ)``, kept positive (a non-positive scale would flip or erase the whole group)."""
        return self.scale * (1 + self.gamma).clamp_min(1e-3)

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.refined_scale(), self.offset, self.group_size, self.level_set)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def final_scale(self) -> torch.Tensor:
        """The learned scale rounded to the stored float16 (codes are re-derived against exactly this)."""
        return round_scale(self.refined_scale().detach())


class FixedGridLinear(nn.Module):
    """Step 2 after error-feedback rounding: the codes are fixed, ``Γ`` scales each group's grid (offset included).

    Args:
        rounded (`Rounded`): the rounded weight and its grid.
        bias (`torch.Tensor`, *optional*): ``[N]``.
        level_set, group_size: the layer's format.
    """

    def __init__(self, rounded: Rounded, bias, level_set, group_size: int):
        super().__init__()
        k = rounded.weight.shape[1]
        self.level_set, self.group_size, self.k = level_set, group_size, k
        s = expand_groups(rounded.scale, group_size, k)
        z = None if rounded.offset is None else expand_groups(rounded.offset, group_size, k)
        self.register_buffer("unit", nearest_levels(unit_ratio(rounded.weight, s, z), level_set))  # L[code] [N, K]
        self.register_buffer("scale", rounded.scale.float())
        self.register_buffer("offset", None if rounded.offset is None else rounded.offset.float())
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.gamma = nn.Parameter(torch.zeros_like(self.scale))

    def grid(self, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scale * factor, None if self.offset is None else self.offset * factor

    def weight_for(self, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        w = expand_groups(scale, self.group_size, self.k) * self.unit
        return w if offset is None else w + expand_groups(offset, self.group_size, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for(*self.grid((1 + self.gamma).clamp_min(1e-3)))
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def result(self, error: float) -> Rounded:
        """The learned grid rounded to the stored float16, and the weight on exactly that grid."""
        s, z = self.grid((1 + self.gamma).clamp_min(1e-3))
        s, z = round_scale(s), None if z is None else round_scale(z)
        return Rounded(self.weight_for(s, z), s, z, error)


class FloatLinear(nn.Module):
    """The float target layer; accumulates the mean squared input per column (activation importance)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.sq_sum, self.rows = None, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
        self.sq_sum = flat.pow(2).sum(0) + (0 if self.sq_sum is None else self.sq_sum)
        self.rows += flat.shape[0]
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def float_block(block: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A float32 copy of ``block`` whose ``PoTLinear`` layers are the float layers they replaced."""
    out = copy.deepcopy(block).float()
    for name, m in pot_modules(out):
        out.set_submodule(name, FloatLinear(weights[name], m.bias))
    return out


def trainable_block(block: nn.Module, weights, importance, cfg) -> nn.Module:
    """A float32 copy of ``block`` with a ``FakeQuantLinear`` (``Γ = 0``) per ``PoTLinear``.

    The initial scale is the layer's stored one, or, with ``importance``, step 1 re-run with the error of each
    column weighted by its mean squared activation.
    """
    out = copy.deepcopy(block).float()
    for p in out.parameters():
        p.requires_grad_(False)
    for name, m in pot_modules(out):
        w = weights[name]
        if importance is not None:
            grid, steps = calibrated_search(cfg)
            s, z = search_scales(w, m.level_set, m.group_size, grid, importance[name], steps)
        else:
            s = m.weight_scale.detach().float()
            z = None if m.weight_offset is None else m.weight_offset.detach().float()
        out.set_submodule(name, FakeQuantLinear(w, s, z, m.bias, m))
    return out


def optimise(block: nn.Module, inputs: BlockInputs, hidden: list, targets: list, cfg, desc: str,
             progress: bool = True) -> list[float]:  # fmt: skip
    """Adam on every ``Γ`` of ``block`` for ``cfg.epochs`` passes; returns the mean loss of each epoch."""
    from .options import uses_amp

    layers = [m for m in block.modules() if isinstance(m, FakeQuantLinear | FixedGridLinear)]
    gammas = [m.gamma for m in layers]
    device = block_device(block)  # where it runs: the cached activations may be offloaded to the CPU
    amp = uses_amp(cfg, device, min((m.level_set.bits for m in layers), default=0))
    opt = torch.optim.Adam(gammas, lr=cfg.learning_rate)
    bs = cfg.calibration_batch_size
    order = torch.Generator().manual_seed(0)
    history = []
    bar = tqdm(total=cfg.epochs * math.ceil(len(hidden) / bs), desc=desc, leave=False, disable=not progress)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            total = 0.0
            perm = torch.randperm(len(hidden), generator=order).tolist()
            for i in range(0, len(perm), bs):
                idx = perm[i : i + bs]
                x = torch.cat([hidden[j] for j in idx]).float()  # [B, L, H]
                y = torch.cat([targets[j] for j in idx]).float()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = block_output(block, x, inputs)
                err = (out.float() - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
                loss = err + cfg.reg_lambda * torch.stack([g.pow(2).mean() for g in gammas]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += err.item() * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{err.item():.3e}")
            history.append(total / len(hidden))
    bar.close()
    return history


def refine_rounded(block, rounded: dict, modules: dict, inputs, hidden, targets, cfg, desc, progress) -> list[float]:
    """Step 2 on a working block whose layers hold rounded weights (codes fixed); updates ``rounded`` in place.

    ``modules`` maps each name to its ``PoTLinear`` (level set, group size).
    """
    for name, r in rounded.items():
        m = modules[name]
        block.set_submodule(name, FixedGridLinear(r, block.get_submodule(name).bias, m.level_set, m.group_size))
    history = optimise(block, inputs, hidden, targets, cfg, desc, progress)
    for name in list(rounded):
        layer = block.get_submodule(name)
        rounded[name] = layer.result(rounded[name].error)
        block.set_submodule(name, WorkLinear(rounded[name].weight, layer.bias))
    return history


def refine_block(name, block, weights, inputs: BlockInputs, hidden, cfg, progress) -> tuple[list, dict]:
    """Nearest rounding + step 2 (``rounding="nearest"``): learns ``Γ`` with codes re-derived at every step."""
    from .weights import FloatWeights

    mods = pot_modules(block)
    with torch.no_grad():
        if not mods:
            return passthrough(block, inputs, hidden)
        w = float_weights(name, mods, weights)
        fblock = float_block(block, w).eval()
        targets = [block_output(fblock, x, inputs).to(x.device) for x in hidden]
        importance = {n: m.sq_sum / m.rows for n, m in fblock.named_modules() if hasattr(m, "sq_sum")}
        del fblock
        k = min(ERROR_SAMPLES, len(hidden))
        stored = trainable_block(block, w, None, cfg).eval()  # Γ = 0 on the stored scales: the calibration-free one
        before = relative_error([block_output(stored, x, inputs) for x in hidden[:k]], targets[:k])
        del stored
        tblock = trainable_block(block, w, importance if cfg.act_weighted_init else None, cfg).eval()
    history = optimise(tblock, inputs, hidden, targets, cfg, f"step 2 {name}", progress)
    with torch.no_grad():
        for n, m in mods:
            fq = tblock.get_submodule(n)
            packed, scale, offset = quantize_weight(
                w[n], m.level_set, m.group_size, name=f"{name}.{n}", scale=fq.final_scale(), offset=fq.offset
            )
            m.set_quantized(packed, scale, offset)
            fq.scale.copy_(scale.float())  # the stored scale, so the next inputs are the quantised block's outputs
            if offset is not None:
                fq.offset.copy_(offset.float())
            fq.gamma.zero_()
            FloatWeights.release(m)
        nxt = [block_output(tblock, x, inputs).to(x.device) for x in hidden]
        after = relative_error(nxt[:k], targets[:k])
    mb = nbytes([*tblock.parameters(), *tblock.buffers()]) / 2**20
    return nxt, {"before": before, "after": after, "loss_per_epoch": history, "float_block_mb": mb,
                 "activations_mb": nbytes([*hidden, *nxt, *targets]) / 2**20}  # fmt: skip
