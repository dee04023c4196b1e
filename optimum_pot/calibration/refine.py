"""PoTPTQ step 2 for one block: learn per-group scale residuals ``Γ`` (``ŝ = s·(1+Γ)``) on the block's output.

The loss is the block-output error against the float block, relative to the target's energy (so one ``λ`` and one
learning rate suit every block, whatever its activation scale), plus ``λ·mean(Γ²)``. Exponents are re-derived from
``ŝ`` at every step (``fake_quantize``: detached codes, gradient to the scale), and Adam updates ``Γ``.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..format.levels import fake_quantize
from ..format.scale_search import round_scale, search_scales
from ..nn.pot_linear import PoTLinear
from .blocks import BlockInputs, block_output


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
        self.importance: torch.Tensor | None = None  # [K] mean squared input, recorded on request

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


class FloatLinear(nn.Module):
    """The float target layer; optionally accumulates the mean squared input per column (activation importance)."""

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


def pot_modules(block: nn.Module) -> list[tuple[str, PoTLinear]]:
    return [(n, m) for n, m in block.named_modules() if isinstance(m, PoTLinear)]


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
            s, z = search_scales(w, m.level_set, m.group_size, cfg.grid_points, importance[name], cfg.refine_steps)
        else:
            s = m.weight_scale.detach().float()
            z = None if m.weight_offset is None else m.weight_offset.detach().float()
        out.set_submodule(name, FakeQuantLinear(w, s, z, m.bias, m))
    return out


@torch.no_grad()
def relative_error(block: nn.Module, inputs: BlockInputs, hidden: list, targets: list) -> float:
    """``Σ‖block(x) − y‖² / Σ‖y‖²`` over the cached samples."""
    num = den = 0.0
    for x, y in zip(hidden, targets):
        out = block_output(block, x.float(), inputs)
        num += (out - y.float()).pow(2).sum().item()
        den += y.float().pow(2).sum().item()
    return num / max(den, 1e-30)


def optimise(
    block: nn.Module, inputs: BlockInputs, hidden: list, targets: list, cfg, desc: str, progress: bool = True
) -> list[float]:
    """Adam on every ``Γ`` of ``block`` for ``cfg.epochs`` passes; returns the mean loss of each epoch."""
    gammas = [m.gamma for m in block.modules() if isinstance(m, FakeQuantLinear)]
    opt = torch.optim.Adam(gammas, lr=cfg.learning_rate)
    bs = cfg.calibration_batch_size
    order = torch.Generator().manual_seed(0)
    history = []
    bar = tqdm(total=cfg.epochs * math.ceil(len(hidden) / bs), desc=desc, leave=False, disable=not progress)
    for _ in range(cfg.epochs):
        total = 0.0
        perm = torch.randperm(len(hidden), generator=order).tolist()
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            x = torch.cat([hidden[j] for j in idx]).float()  # [B, L, H]
            y = torch.cat([targets[j] for j in idx]).float()
            err = (block_output(block, x, inputs) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
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
