"""The PoT level set and its pure quantisation math.

A weight is ``w = s_g · (−1)^p · 2^(−e)``: ``p`` is the sign bit (the code's most significant bit), ``e`` the
exponent code in the remaining ``bits - 1`` bits and ``s_g`` one scale per group of ``group_size`` input columns.
The scale is the largest magnitude of the group's grid, so ``e = 0`` means ``±s`` and every further code halves it.
With ``zero_level=True`` the last exponent code (all ones) means an exact zero instead of ``s·2^-(2^(b-1)-1)``.

Everything here is a pure function of tensors: modules, kernels and calibration all call these, and every kernel is
tested against :func:`decode`.
"""

import torch

SUPPORTED_BITS = (2, 3, 4)


def num_exponent_codes(bits: int) -> int:
    """Number of exponent codes, ``2^(bits-1)``: the sign takes one bit."""
    return 1 << (bits - 1)


def max_nonzero_exponent(bits: int, zero_level: bool) -> int:
    """The largest exponent code that still means a non-zero magnitude."""
    return num_exponent_codes(bits) - (2 if zero_level else 1)


def num_groups(in_features: int, group_size: int) -> int:
    """Groups per row; the last one is partial when ``group_size`` does not divide ``in_features``."""
    return -(-in_features // group_size)


def expand_groups(scale: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeats each group's scale over its columns: ``[N, G] -> [N, K]`` (the last group may be partial)."""
    return scale.repeat_interleave(group_size, dim=-1)[..., :in_features]


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zero-pads the columns to whole groups and views them as ``[N, G, group_size]``."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)


def group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Largest magnitude of each group: ``[N, K] -> [N, G]`` in float32 (zero padding never wins)."""
    return group_view(w.float().abs(), group_size).amax(dim=-1)


def nearest_exponent(ratio: torch.Tensor, bits: int, zero_level: bool) -> torch.Tensor:
    """Exponent code of the grid point nearest (in the linear domain) to ``ratio = |w| / s``.

    Between ``2^-e`` and ``2^-(e+1)`` the midpoint is ``0.75·2^-e``, so the nearest code is
    ``floor(-log2(ratio / 1.5))``, clamped to the grid. Returns float32 codes (exact small integers).
    """
    e = torch.floor(-torch.log2(ratio / 1.5)).clamp(0, max_nonzero_exponent(bits, zero_level))
    if zero_level:
        # Below half of the smallest non-zero level, zero is nearer.
        smallest = torch.exp2(-max_nonzero_exponent(bits, zero_level) * torch.ones((), device=ratio.device))
        e = torch.where(ratio < 0.5 * smallest, float(num_exponent_codes(bits) - 1), e)
    return e


def encode(w: torch.Tensor, scale_full: torch.Tensor, bits: int, zero_level: bool) -> torch.Tensor:
    """Codes of ``w`` on the grid of ``scale_full`` (both ``[N, K]``): ``uint8`` with the sign in bit ``bits-1``.

    A zero scale (an all-zero group) encodes every weight as the largest magnitude; it decodes to zero anyway.
    """
    w = w.float()
    s = scale_full.float()
    ratio = w.abs() / torch.where(s > 0, s, torch.ones_like(s))
    e = nearest_exponent(ratio, bits, zero_level).to(torch.uint8)
    sign = (w < 0).to(torch.uint8) << (bits - 1)
    return sign | e


def unit_values(codes: torch.Tensor, bits: int, zero_level: bool) -> torch.Tensor:
    """``(−1)^p · 2^(−e)`` (or 0 for the zero code) of each code, float32."""
    codes = codes.to(torch.int32)
    e = codes & (num_exponent_codes(bits) - 1)
    sign = 1.0 - 2.0 * ((codes >> (bits - 1)) & 1).float()
    mag = torch.exp2(-e.float())
    if zero_level:
        mag = torch.where(e == num_exponent_codes(bits) - 1, torch.zeros_like(mag), mag)
    return sign * mag


def decode(codes: torch.Tensor, scale_full: torch.Tensor, bits: int, zero_level: bool) -> torch.Tensor:
    """The reference decode: ``s · (−1)^p · 2^(−e)`` in float32, ``[N, K]``."""
    return scale_full.float() * unit_values(codes, bits, zero_level)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, group_size: int, bits: int, zero_level: bool) -> torch.Tensor:
    """Differentiable PoT quantisation of ``w`` ``[N, K]`` with per-group ``scale`` ``[N, G]``.

    Exponents come from detached values; the gradient reaches ``scale`` through ``s · unit`` and reaches ``w``
    through a straight-through estimator, so both can be learned (calibration and QAT use this).
    """
    s_full = expand_groups(scale, group_size, w.shape[-1])
    codes = encode(w.detach(), s_full.detach(), bits, zero_level)
    q = s_full * unit_values(codes, bits, zero_level).to(s_full.dtype)
    return q + (w - w.detach())
