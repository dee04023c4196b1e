"""In-register decoding of packed weight tiles, shared by every Triton kernel here.

Decode is PoTPTQ's fixed-point addition, generalised to any registered level set: a level is at most two signed
powers of two, and ``s · (±2^e)`` is built by adding ``e`` to the exponent field of the scale's bit pattern and
flipping its sign bit, one integer add per term with the term's packed descriptor (kernels/triton/tables.py, loaded
by code); a two-term level adds the two terms' floats. No per-weight multiply, no int→float convert. The arithmetic
runs on the float32 bit pattern of the scale (8 exponent bits), not the float16 one; the float32 result (plus the
group's offset, a float32 add as in the reference) is then rounded once to the activation dtype. Why this is exact:

* A float16 scale, even a subnormal one (down to 2^-24), is a *normal* float32 with exponent field 103…142; a term
  exponent in ``tables.HALF_SAFE_EXPONENTS`` (−102…112; registered families use −7…3) keeps the field in 1…254, so
  each term is the exact float32 ``s·2^e`` and the sum of two is rounded once, as the reference's ``s·L`` is. Results
  below or above float16's range are rounded by the final cast (to a subnormal, zero or inf), like the reference,
  instead of wrapping the exponent field, which a float16 bit trick would do.
* The only float16 scale outside those fields is ±0 (an all-zero group): it is selected to 0.
* Otherwise (``HALF_SAFE=False``: bfloat16/float32 scales, which can be float32-subnormal, tiny or huge, or terms
  beyond those exponents) lanes whose fields would leave 1…254 fall back to ``s · L`` by a multiply, exact like the
  reference's.

Scales are assumed finite on the unguarded path (checkpoints are checked on load). See docs/gpu_kernel.md.
"""

import triton
import triton.language as tl

MODE_LEVELS = 0  # s · L[code] (+ z): every registered level set
MODE_UNIFORM = 1  # (q − z) · s: the uniform int baseline of the benchmark
ONE_BITS: tl.constexpr = tl.constexpr(0x3F800000)  # float32 1.0: decoding a term on it gives the unit term ±2^e


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
def term_value(s_bits, field):
    """``s · (±2^e)`` for the 9-bit term ``field`` (low bits of ``field``): one add into the exponent and sign bits."""
    return ((field << 23) + s_bits).to(tl.float32, bitcast=True)


@triton.jit
def level_decode(codes, scale, t_ptr, TERMS: tl.constexpr, HALF_SAFE: tl.constexpr):
    """``scale · L[code]`` in float32 by exponent-field adds (``scale`` float32, ``t_ptr`` the descriptors).

    One term (``TERMS = 1``) is one integer add; two are two adds and one float add, which rounds the exact
    ``s·2^a ± s·2^b`` once, exactly like the reference's float32 ``s · L``. Guards: see the module docstring.
    """
    d = tl.load(t_ptr + codes)  # [BN, BK] int32 descriptors (kernels/triton/tables.py)
    s_bits = scale.to(tl.int32, bitcast=True)
    w = term_value(s_bits, d)
    if TERMS == 2:
        w += term_value(s_bits, d >> 9)
    field = (s_bits >> 23) & 0xFF  # the scale's float32 exponent field
    if HALF_SAFE:
        w = tl.where(field == 0, 0.0, w)  # the zero scale: the only float16 scale outside the safe fields
    else:
        # Lanes whose exponent fields would leave the normal range (or start outside it): ``s · L`` by a multiply,
        # with ``L`` itself decoded from the bits of 1.0 (exact: every term is a normal float32 power of two).
        e = (d << 24) >> 24  # the first term's exponent (sign-extended low 8 bits)
        bad = (field == 0) | (field == 255) | (field + e < 1) | (field + e > 254)
        unit = term_value(ONE_BITS, d)
        if TERMS == 2:
            e = (d << 15) >> 24
            bad = bad | (field + e < 1) | (field + e > 254)
            unit += term_value(ONE_BITS, d >> 9)
        w = tl.where(bad, scale * unit, w)
    if TERMS == 1:
        w = tl.where(d < 0, 0.0, w)  # the zero level (bit 31)
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
    t_ptr,
    offs_n,
    k0,
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
    BK: tl.constexpr,
):
    """Decoded weight tile ``W[offs_n, k0 : k0+BK]`` ``[BN, BK]`` in float32.

    ``z_ptr`` holds the offsets (``HAS_OFFSET``) or the uniform baseline's zero points; ``t_ptr`` the level set's
    descriptors. Rows ``≥ N`` decode to 0; columns ``≥ K`` hold padding codes whose products the callers mask
    (their activations are loaded as 0, their stores are masked).
    """
    codes = load_codes(w_ptr, w_stride, offs_n, k0, N, K, BITS, BK)
    scale = load_group_values(s_ptr, s_stride, offs_n, k0, N, K, GROUP, BK, INTERPRETED)
    if HAS_OFFSET or MODE == 1:
        # Loaded before the descriptors are gathered: ptxas then needs fewer registers (sm_90, measured AOT).
        z = load_group_values(z_ptr, s_stride, offs_n, k0, N, K, GROUP, BK, INTERPRETED)
    if MODE == 0:
        w = level_decode(codes, scale, t_ptr, TERMS, HALF_SAFE)
        if HAS_OFFSET:
            w += z  # float32, as the reference adds it; then the caller rounds once to the activation dtype
    else:
        w = uniform_decode(codes, scale, z)
    return w
