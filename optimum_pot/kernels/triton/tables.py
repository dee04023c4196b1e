"""A level set as the Triton kernels read it: one packed int32 descriptor per code (pure Python, no triton import).

The kernels decode ``s · L[code]`` by exponent-field adds on the float32 bit pattern of the scale ``s``: a term
``±2^e`` is ``bits(s) + (e << 23)`` with the sign bit flipped for ``−``. Both at once is one 32-bit add of the 9-bit
*term field* ``(e & 0x1FF) ^ (sign << 8)`` shifted left by 23: the low 8 bits land in the exponent field, and bit 8
(``e``'s two's-complement sign, flipped for a negative term) lands in the sign bit, where an add is an XOR. The field
also keeps ``e`` itself (sign-extend its low 8 bits), which the guarded decode needs.

Descriptor of a code, by the kernels' ``TERMS`` (the level set's most terms per level):

* ``TERMS = 1`` (e.g. ``pot``): bits 0–8 the term field; bit 31 set for the zero level (decoded by a select).
* ``TERMS = 2`` (e.g. ``sp2``, ``int``): bits 0–8 and 9–17 two term fields, always both used so the decode has no
  branch: a single-term level ``±2^a`` is stored as ``±2^(a−1) ± 2^(a−1)``, the zero level as ``2^0 − 2^0`` (exact:
  ``s·2^(a−1)`` doubled, and ``s − s = 0``).

A new family is new data here, never a kernel change. See docs/gpu_kernel.md.
"""

from functools import cache

from ...format.level_set import LevelSet

ZERO_FLAG = -(1 << 31)  # bit 31 as an int32: the zero level of a TERMS = 1 table
FIELD_BITS = 9
# Term exponents the descriptors hold: ``2^e`` must be a normal float32 (the guarded decode builds it from bits).
MIN_EXPONENT, MAX_EXPONENT = -126, 127
# A two-term level is exact in float32 (as the reference's float32 table holds it) when its terms are this close.
MAX_TERM_GAP = 23
# float16 scales have float32 exponent fields 103 (2^-24, the smallest subnormal) … 142 (65504): terms within these
# exponents keep every non-zero float16 scale inside float32's normal range (fields 1 … 254), unguarded.
HALF_SAFE_EXPONENTS = (1 - 103, 254 - 142)


def kernel_terms(level_set: LevelSet) -> list[tuple[tuple[int, int], ...]]:
    """Per code, the ``(sign, exponent)`` terms the kernels add: ``level_set.terms``, padded to ``TERMS`` terms."""
    if level_set.max_terms == 1:
        return [t if t else ((1, 0),) for t in level_set.terms]  # the zero level's term is selected away
    padded = []
    for t in level_set.terms:
        if not t:
            t = ((1, 0), (-1, 0))
        elif len(t) == 1:
            ((sign, e),) = t
            t = ((sign, e - 1), (sign, e - 1))
        padded.append(t)
    return padded


@cache  # called on every kernel call: the level set's answers never change
def unsupported_reason(level_set: LevelSet) -> str | None:
    """Why the descriptors cannot hold ``level_set`` exactly (``None`` when they can): then the entry uses the
    reference instead. No registered family comes near these limits."""
    for code, terms in enumerate(kernel_terms(level_set)):
        exps = [e for _, e in terms]
        if min(exps) < MIN_EXPONENT or max(exps) > MAX_EXPONENT:
            return f"code {code} has a term 2^{min(exps)}..2^{max(exps)} outside float32's normal range"
        if max(exps) - min(exps) > MAX_TERM_GAP:
            return f"code {code}'s level {level_set.values[code]} is not exact in float32"
    return None


def term_field(sign: int, exponent: int) -> int:
    """The 9-bit field whose ``<< 23`` adds ``exponent`` to a float32 exponent field and applies ``sign``."""
    return (exponent & 0x1FF) ^ (0x100 if sign < 0 else 0)


@cache
def descriptors(level_set: LevelSet) -> tuple[int, ...]:
    """One int32 descriptor per code (see the module docstring), as Python ints in ``[-2^31, 2^31)``."""
    out = []
    for code, terms in enumerate(kernel_terms(level_set)):
        if level_set.max_terms == 1:
            out.append(ZERO_FLAG if not level_set.terms[code] else term_field(*terms[0]))
        else:
            out.append(term_field(*terms[0]) | term_field(*terms[1]) << FIELD_BITS)
    return tuple(out)


@cache
def half_safe(level_set: LevelSet) -> bool:
    """Whether float16 scales need no exponent guard with this level set (only the zero scale is selected)."""
    lo, hi = HALF_SAFE_EXPONENTS
    exps = [e for terms in kernel_terms(level_set) for _, e in terms]
    return lo <= min(exps) and max(exps) <= hi


def decode_descriptor(d: int, terms: int) -> float:
    """The unit value a descriptor stands for (the inverse of :func:`descriptors`, for tests and docs)."""
    if terms == 1 and d < 0:
        return 0.0
    value = 0.0
    for i in range(terms):
        field = (d >> (FIELD_BITS * i)) & 0x1FF
        e = (field & 0xFF) - ((field & 0x80) << 1)  # sign-extend the low 8 bits
        sign = -1 if ((field >> 8) ^ (e < 0)) & 1 else 1
        value += sign * 2.0**e
    return value
