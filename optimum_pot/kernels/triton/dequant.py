"""In-register decoding of packed weight tiles, shared by every Triton kernel here.

PoT decode is PoTPTQ's fixed-point addition: ``s · (−1)^p · 2^(−e)`` is built by subtracting ``e`` from the
exponent field of the scale's bit pattern and XOR-ing ``p`` into its sign bit; no multiply, no int→float convert.
The arithmetic runs on the float32 bit pattern of the scale (8 exponent bits), not the float16 one, and the result is
then rounded once to the activation dtype, exactly like the reference (decode in float32, cast). Why this is safe:

* A float16 scale, even a subnormal one (down to 2^-24), is a *normal* float32 with exponent field ≥ 127 − 24 = 103,
  and ``e ≤ 7``, so the field never underflows; the largest float16 (65504) only shrinks. The shifted value is the
  exact float32 ``s·2^-e``; when it is below float16's range the final cast rounds it correctly (to a float16
  subnormal or zero) instead of wrapping the exponent field, which is what a float16 bit trick would do.
* The only float16 scale whose field is ≤ ``e`` is ±0 (an all-zero group); it is selected to 0.
* Scales in bfloat16 or float32 can be float32-subnormal or tiny enough to underflow; for those
  (``SCALE_IS_HALF=False``) the guarded lanes fall back to a multiply by ``2^-e``, which is exact in float32.

See docs/gpu_kernel.md.
"""

import triton
import triton.language as tl

MODE_POT = 0
MODE_UNIFORM = 1


@triton.jit
def load_codes(w_ptr, w_stride, offs_n, k0, N, K, BITS: tl.constexpr, BK: tl.constexpr):
    """Codes ``[BN, BK]`` (int32) of rows ``offs_n``, columns ``k0 … k0+BK`` from the canonical bit stream.

    Eight codes fill exactly ``BITS`` bytes (code ``k`` at stream bits ``[k·b, (k+1)·b)``), and rows hold whole
    8-code chunks, so the tile is ``BK/8`` chunks: ``BITS`` byte loads per chunk assemble a little-endian word, and
    eight shifts split it. Every byte is loaded once (no per-code gathers), for 2, 3 and 4 bits alike.
    ``k0`` is a multiple of ``BK``, itself a multiple of 8.
    """
    chunks = k0 // 8 + tl.arange(0, BK // 8)  # [BK/8]
    mask = (offs_n < N)[:, None] & (chunks * 8 < K)[None, :]
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * w_stride + (chunks * BITS)[None, :]  # [BN, BK/8]: first bytes
    word = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    for j in tl.static_range(1, BITS):
        word = word | (tl.load(ptrs + j, mask=mask, other=0).to(tl.int32) << (8 * j))
    shifts = tl.arange(0, 8) * BITS
    codes = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, BK/8, 8]
    return tl.reshape(codes, (offs_n.shape[0], BK))


@triton.jit
def pot_decode(codes, scale, BITS: tl.constexpr, ZERO_LEVEL: tl.constexpr, SCALE_IS_HALF: tl.constexpr):
    """``scale · (−1)^p · 2^(−e)`` in float32 by exponent-field subtraction and sign XOR (``scale`` is float32)."""
    e_mask: tl.constexpr = (1 << (BITS - 1)) - 1
    e = codes & e_mask
    sign = (codes >> (BITS - 1)) & 1
    s_bits = scale.to(tl.int32, bitcast=True)
    w = ((s_bits - (e << 23)) ^ (sign << 31)).to(tl.float32, bitcast=True)
    # Lanes whose exponent field would underflow: only ±0 for float16 scales (see the module docstring).
    tiny = ((s_bits >> 23) & 0xFF) <= e
    if SCALE_IS_HALF:
        w = tl.where(tiny, 0.0, w)
    else:
        signed = tl.where(sign == 1, -scale, scale)
        w = tl.where(tiny, signed * tl.exp2(-e.to(tl.float32)), w)
    if ZERO_LEVEL:
        w = tl.where(e == e_mask, 0.0, w)
    return w


@triton.jit
def round_to(w, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """``w.to(dtype)`` with round-to-nearest-even, as the GPU converts.

    Triton's CPU interpreter truncates float32 → bfloat16, so there the rounding is done on the bit pattern
    (add ``0x7FFF`` plus the kept LSB, drop 16 bits: exact RTNE for finite values, subnormals included).
    """
    if INTERPRETED and dtype == tl.bfloat16:
        bits = w.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w.to(dtype)


@triton.jit
def to_float32(v, INTERPRETED: tl.constexpr):
    """``v.to(tl.float32)``, exact for bfloat16 subnormals also in the interpreter (which flushes them to zero)."""
    if INTERPRETED and v.dtype == tl.bfloat16:
        return (v.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def dot_acc(x, w, acc, FP32_DOT: tl.constexpr, INTERPRETED: tl.constexpr):
    """``acc + x @ w.T`` (``x`` ``[BM, BK]``, ``w`` ``[BN, BK]``); ``FP32_DOT`` computes in float32, IEEE.

    ``FP32_DOT`` serves float32 activations, and bfloat16 ones in the interpreter, whose ``tl.dot`` misreads
    bfloat16 operands; products of bfloat16 values are exact in float32, so only the summation order differs.
    """
    if FP32_DOT:
        xf = to_float32(x, INTERPRETED)
        wf = to_float32(w, INTERPRETED)
        return tl.dot(xf, tl.trans(wf), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def uniform_decode(codes, scale, zero):
    """Uniform (asymmetric) integer decode ``(q − z) · s`` in float32: the comparison baseline."""
    return (codes.to(tl.float32) - zero) * scale


@triton.jit
def load_group_values(ptr, stride, offs_n, k0, N, K, GROUP: tl.constexpr, BK: tl.constexpr, INTERPRETED: tl.constexpr):
    """Per-group values (scales or zero points) for a ``[BN, BK]`` tile, float32.

    When ``BK`` divides ``GROUP`` the tile lies in one group: one value per row, broadcast as ``[BN, 1]``. Otherwise
    (small or odd groups) each column gathers its own, ``[BN, BK]``; the last group may be partial either way.
    """
    if GROUP % BK == 0:
        vals = tl.load(ptr + offs_n.to(tl.int64) * stride + k0 // GROUP, mask=offs_n < N, other=0.0)[:, None]
    else:
        offs_k = k0 + tl.arange(0, BK)
        mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        vals = tl.load(ptr + offs_n.to(tl.int64)[:, None] * stride + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    return to_float32(vals, INTERPRETED)


@triton.jit
def weight_tile(
    w_ptr,
    s_ptr,
    z_ptr,
    offs_n,
    k0,
    N,
    K,
    w_stride,
    s_stride,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    ZERO_LEVEL: tl.constexpr,
    SCALE_IS_HALF: tl.constexpr,
    MODE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BK: tl.constexpr,
):
    """Decoded weight tile ``W[offs_n, k0 : k0+BK]`` ``[BN, BK]`` in float32.

    Rows ``≥ N`` decode to 0; columns ``≥ K`` hold padding codes whose products the callers mask (their
    activations are loaded as 0, their stores are masked).
    """
    codes = load_codes(w_ptr, w_stride, offs_n, k0, N, K, BITS, BK)
    scale = load_group_values(s_ptr, s_stride, offs_n, k0, N, K, GROUP, BK, INTERPRETED)
    if MODE == 0:
        w = pot_decode(codes, scale, BITS, ZERO_LEVEL, SCALE_IS_HALF)
    else:
        zero = load_group_values(z_ptr, s_stride, offs_n, k0, N, K, GROUP, BK, INTERPRETED)
        w = uniform_decode(codes, scale, zero)
    return w
