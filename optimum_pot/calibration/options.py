"""Validation of the calibration fields of ``PoTConfig`` (called from ``PoTConfig.post_init``)."""

import math

import torch

from ..utils.device import fast_bfloat16

ROUNDINGS = ("gptq", "nearest")
GROUP_SCALES = ("static", "dynamic")


def finite_number(v) -> bool:
    """Whether ``v`` is a finite int or float (not a bool, a string, inf or NaN): the type check of every float
    field of ``PoTConfig``."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_calibration_fields(cfg) -> None:
    """Raises a `ValueError` naming the valid values for a bad calibration field of ``cfg``."""
    from ..format.registry import get_family
    from .hessian import check_damping

    if cfg.rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {cfg.rounding!r}.")
    if cfg.group_scales not in GROUP_SCALES:
        raise ValueError(f"group_scales must be one of {list(GROUP_SCALES)}, got {cfg.group_scales!r}.")
    check_damping(cfg.damp_percent)
    for name in ("act_order", "true_sequential"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(cfg, name)!r}.")
    if cfg.refine_scales is not None and not isinstance(cfg.refine_scales, bool):
        raise ValueError(f"refine_scales must be True, False or None, got {cfg.refine_scales!r}.")
    if cfg.amp is not None and not isinstance(cfg.amp, bool):
        raise ValueError(f"amp must be True, False or None (automatic), got {cfg.amp!r}.")
    b = cfg.gptq_block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"gptq_block_size must be an integer >= 1, got {b!r}.")
    if cfg.bit_budget is not None:
        bits = get_family(cfg.levels).bits
        if not finite_number(cfg.bit_budget) or not min(bits) <= cfg.bit_budget <= max(bits):
            raise ValueError(
                f"bit_budget must be an average number of bits between the smallest and largest widths of level set "
                f"{cfg.levels!r} ({min(bits)} and {max(bits)}), got {cfg.bit_budget!r}; pass e.g. "
                f"PoTConfig(bit_budget=3.5), or set bits= for one width everywhere."
            )


def refines_scales(cfg) -> bool:
    """Whether PoTPTQ step 2 (the learned scale residual) runs: ``refine_scales``, by default yes (after GPTQ it
    measured 29.69 → 29.14 at 4 bits, 34.39 → 32.85 at 3, 75.91 → 64.87 at 2 on SmolLM2; docs/calibration.md)."""
    return True if cfg.refine_scales is None else cfg.refine_scales


# Narrowest code width at which ``amp=None`` runs step 2 in bfloat16. Measured on SmolLM2 (sp2, g64, one run each):
# 4-bit 29.06 with bfloat16 vs 29.14 in float32 (and 172 vs 248 s of calibration); 3-bit 33.20 vs 32.85; 2-bit
# 67.89 vs 64.87 — so narrower blocks keep float32.
AMP_MIN_BITS = 4


def uses_amp(cfg, device: torch.device, bits: int) -> bool:
    """Whether step 2 runs a block whose narrowest layer has ``bits`` in bfloat16 autocast: ``amp`` when set; by
    default where bfloat16 matmuls are fast (CUDA, or a CPU with AMX tiles or AVX512-BF16: 4.7x / 5.2x fp32 for a
    [8192, 576] x [576, 1536] matmul on 2 cores) and ``bits >= AMP_MIN_BITS``."""
    if cfg.amp is not None:
        return cfg.amp
    return bits >= AMP_MIN_BITS and fast_bfloat16(device)
