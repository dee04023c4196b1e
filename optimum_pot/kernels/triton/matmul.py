"""Triton kernels: split-K GEMV (small M), tiled GEMM and dequantise-only, for any level set or uniform int weights.

All three read the canonical packed layout directly (``[N, ceil(K/8)·bits]`` uint8, see format/packing.py) and
decode in registers with :func:`dequant.weight_tile`; ``MODE`` picks the level-set decode (0: exponent-field adds,
``TERMS`` per level, plus the offset when ``HAS_OFFSET``) or the uniform ``(q − z)·s`` baseline (1), so the benchmark
compares the decodes inside otherwise identical kernels. Accumulation is float32. The decoded
weight is rounded to the activation dtype before it is multiplied, as in the reference.
"""

import triton
import triton.language as tl

from .dequant import dot_acc, round_to, to_float32, weight_tile


@triton.jit
def gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    x_stride,
    w_stride,
    s_stride,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    TERMS: tl.constexpr,
    HALF_SAFE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ W.T (+ bias)`` on ``[BM, BN]`` output tiles, ``tl.dot`` on a decoded ``[BK, BN]`` tile."""
    # Grouped tile order: consecutive programs share weight columns, so decoded tiles are re-read from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * x_stride + offs_k[None, :], mask=x_mask, other=0.0)
        w = weight_tile(  # [BN, BK] float32
            w_ptr, s_ptr, z_ptr, t_ptr, offs_n, k0, N, K, w_stride, s_stride, GROUP, BITS, TERMS, HALF_SAFE,
            HAS_OFFSET, MODE, INTERPRETED, BK,
        )  # fmt: skip
        acc = dot_acc(x, round_to(w, x.dtype, INTERPRETED), acc, FP32_DOT, INTERPRETED)  # w: [BN, BK]
    if HAS_BIAS:
        acc += to_float32(tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0), INTERPRETED)[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(
        y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
        round_to(acc, y_ptr.dtype.element_ty, INTERPRETED),
        mask=y_mask,
    )


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    t_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    x_stride,
    w_stride,
    s_stride,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    TERMS: tl.constexpr,
    HALF_SAFE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Split-K product for ``M ≤ BM`` rows: program ``(n, s)`` covers ``BN`` outputs and the ``s``-th slice of K.

    With ``SPLIT`` the float32 partial sums go to ``y[s, M, N]`` and are reduced afterwards (deterministic, no
    atomics); otherwise the program writes the final ``y[M, N]`` with the bias.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_begin = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        x_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * x_stride + offs_k[None, :], mask=x_mask, other=0.0)
        w = weight_tile(  # [BN, BK] float32
            w_ptr, s_ptr, z_ptr, t_ptr, offs_n, k0, N, K, w_stride, s_stride, GROUP, BITS, TERMS, HALF_SAFE,
            HAS_OFFSET, MODE, INTERPRETED, BK,
        )  # fmt: skip
        w = to_float32(
            round_to(w, x.dtype, INTERPRETED), INTERPRETED
        )  # [BN, BK]: round like the reference, multiply in float32
        acc += tl.sum(to_float32(x, INTERPRETED)[:, None, :] * w[None, :, :], axis=2)  # [BM, BN]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        y_off = (pid_s * M + offs_m)[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(y_ptr + y_off, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            acc += to_float32(tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0), INTERPRETED)[None, :]
        y_off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(y_ptr + y_off, round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=y_mask)


@triton.jit
def dequant_kernel(
    w_ptr,
    s_ptr,
    z_ptr,
    t_ptr,
    out_ptr,
    N,
    K,
    w_stride,
    s_stride,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    TERMS: tl.constexpr,
    HALF_SAFE: tl.constexpr,
    HAS_OFFSET: tl.constexpr,
    MODE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Writes the decoded weight ``[N, K]`` in ``out``'s dtype (the dequantise-only benchmark and a test hook)."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    offs_k = k0 + tl.arange(0, BK)
    w = weight_tile(  # [BN, BK] float32
        w_ptr, s_ptr, z_ptr, t_ptr, offs_n, k0, N, K, w_stride, s_stride, GROUP, BITS, TERMS, HALF_SAFE, HAS_OFFSET,
        MODE, INTERPRETED, BK,
    )  # fmt: skip
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(
        out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
        round_to(w, out_ptr.dtype.element_ty, INTERPRETED),
        mask=mask,
    )
