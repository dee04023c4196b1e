"""Activation rounding of the integer CPU path (``backend="cpu_int8"``), as a pure function.

The kernel (``kernels/cpu/pot_i8.cpp``) rounds each row of ``x`` per block of 64 columns to int8: scale
``max|x| / 127`` (fp32), ``q = round_half_even(x * (127 / max|x|))``. This is the one reference its integer path is
tested against: ``pot_linear_reference(fake_quantize_activations_int8(x), ...)``.
"""

import torch

INT8_BLOCK = 64  # columns per activation scale: one kernel chunk


def fake_quantize_activations_int8(x: torch.Tensor, block: int = INT8_BLOCK) -> torch.Tensor:
    """``x`` rounded to int8 per row and per ``block`` columns and scaled back (fp32).

    Args:
        x (`torch.Tensor`): ``[..., K]`` activations.
        block (`int`, *optional*, defaults to 64): columns sharing one scale (the last block may be partial).

    Returns:
        `torch.Tensor`: ``[..., K]`` fp32, each value ``q * max|x_block| / 127`` with ``q`` in ``[-127, 127]``;
        blocks holding inf or nan become nan.
    """
    k = x.shape[-1]
    n_blocks = -(-k // block)
    xf = torch.nn.functional.pad(x.float(), (0, n_blocks * block - k))
    xb = xf.reshape(*x.shape[:-1], n_blocks, block)  # [..., n_blocks, block]
    amax = xb.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(xb).all(-1, keepdim=True)
    inv = torch.where(finite & (amax > 0), 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)  # ties to even, as lrint in the kernel
    out = q * torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))
    return out.reshape(*x.shape[:-1], n_blocks * block)[..., :k]
