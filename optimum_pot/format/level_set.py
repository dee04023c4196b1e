"""``LevelSet``: the one object that says what a code means.

A quantised weight is ``w = s_g · L[code] (+ z_g)``: ``s_g`` one float16 scale per group of input columns, ``L`` the
level set's table of ``2^bits`` unit values and, for level sets with a per-group ``offset``, ``z_g`` one float16
offset per group. Every level is a sum of at most ``MAX_TERMS`` signed powers of two, so a weight is decoded with
shifts (or exponent-field adds) and one add per term, never a per-weight multiply: the terms are recorded with each
level so kernels can decode by exponent arithmetic.

Everything that encodes, decodes, searches scales, packs or computes with codes takes a ``LevelSet``; families of
level sets (``pot``, ``sp2``, ``int``) are registered in :mod:`.registry`.
"""

import math
from dataclasses import dataclass, field
from fractions import Fraction

MAX_TERMS = 2  # at most two signed powers of two per level: two shifts and an add
SUPPORTED_BITS = (2, 3, 4)
LAYOUT = "bitstream-le"  # codes packed as a little-endian bit stream per row (format/packing.py)
INT8_MAX_MAGNITUDE = 128  # the int8 CPU path multiplies |level|·2^F as an unsigned byte against int8 activations


def power_terms(value: float) -> tuple[tuple[int, int], ...]:
    """``value`` as its fewest signed powers of two: ``((sign, exponent), ...)`` with ``value = Σ sign·2^exponent``.

    The non-adjacent form (canonical signed digits) of a dyadic rational has the fewest non-zero digits.

    Raises:
        ValueError: ``value`` is not a finite dyadic rational (``m / 2^k``).
    """
    if not math.isfinite(value):
        raise ValueError(f"level {value!r} is not finite")
    frac = Fraction(value)
    if frac.denominator & (frac.denominator - 1):
        raise ValueError(f"level {value!r} is not a sum of powers of two (its denominator is not a power of two)")
    shift = frac.denominator.bit_length() - 1  # value = n / 2^shift
    n, pos, terms = frac.numerator, 0, []
    while n:
        if n & 1:
            digit = 2 - (n & 3)  # +1 if n ≡ 1 (mod 4), -1 if n ≡ 3: the non-adjacent form
            terms.append((digit, pos - shift))
            n -= digit
        n >>= 1
        pos += 1
    return tuple(sorted(terms, key=lambda t: -t[1]))


@dataclass(frozen=True)
class LevelSet:
    """A table of quantisation levels and how codes index it.

    Args:
        family (`str`): registry family, e.g. ``"pot"`` (single-term), ``"sp2"`` (two-term), ``"int"``.
        bits (`int`): bits per code; the table has ``2^bits`` entries.
        values (`tuple[float, ...]`): unit value of each code (``L[code]``), in units of the group scale.
        offset (`bool`): whether each group also stores a float16 offset ``z`` (``w = s·L[code] + z``).
        variant (`str`): a family's named variant (``"nozero"`` for the PoT table without its zero level), part of
            the id.
        description (`str`): one line for docs and model cards.

    Attributes (derived):
        terms: per code, the signed powers of two of its level (at most ``MAX_TERMS``).
        zero_level: whether some code decodes to exactly zero (before the offset).
        levels: the distinct values, ascending; ``midpoints`` between neighbours (the nearest-level rule).
        int8_shift: ``F`` such that every ``L·2^F`` is an integer of magnitude ≤ 128 (the int8 CPU path), or
            ``None`` when no such ``F`` exists.
    """

    family: str
    bits: int
    values: tuple[float, ...]
    offset: bool = False
    variant: str = ""
    description: str = ""
    terms: tuple = field(init=False, repr=False, compare=False)
    levels: tuple[float, ...] = field(init=False, repr=False, compare=False)
    midpoints: tuple[float, ...] = field(init=False, repr=False, compare=False)
    canonical_codes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    int8_shift: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise ValueError(f"LevelSet bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}.")
        values = tuple(float(v) for v in self.values)
        if len(values) != 1 << self.bits:
            raise ValueError(f"A {self.bits}-bit level set needs {1 << self.bits} values, got {len(values)}.")
        terms = tuple(power_terms(v) for v in values)
        if max(len(t) for t in terms) > MAX_TERMS:
            worst = max(values, key=lambda v: len(power_terms(v)))
            raise ValueError(f"level {worst} needs more than {MAX_TERMS} powers of two; not multiply-free.")
        levels = tuple(sorted(set(values)))
        if len(levels) < 2:
            raise ValueError("A level set needs at least two distinct levels.")
        set_ = object.__setattr__
        set_(self, "values", values)
        set_(self, "terms", terms)
        set_(self, "levels", levels)
        set_(self, "midpoints", tuple((a + b) / 2 for a, b in zip(levels, levels[1:])))
        # The code written for each distinct level: the first code holding it (+0 before −0 for the PoT table).
        set_(self, "canonical_codes", tuple(values.index(v) for v in levels))
        set_(self, "int8_shift", _int8_shift(values))

    @property
    def id(self) -> str:
        """Canonical id, e.g. ``"pot:4"``, ``"pot:3:nozero"``, ``"sp2:4:offset"``: what ops and checkpoints name."""
        return ":".join([self.family, str(self.bits)] + [p for p in (self.variant, "offset" * self.offset) if p])

    @property
    def zero_level(self) -> bool:
        return 0.0 in self.values

    @property
    def max_abs(self) -> float:
        """Largest level magnitude: a symmetric scale search puts it at the group's largest weight."""
        return max(abs(v) for v in self.values)

    @property
    def max_terms(self) -> int:
        return max(len(t) for t in self.terms)

    def to_dict(self) -> dict:
        """JSON-safe description (safetensors metadata, docs): family, bits, values, offset, layout."""
        return {"id": self.id, "family": self.family, "bits": self.bits, "values": list(self.values),
                "offset": self.offset, "layout": LAYOUT}  # fmt: skip

    def __str__(self) -> str:
        return self.id


def _int8_shift(values: tuple[float, ...]) -> int | None:
    for shift in range(0, 16):
        ints = [v * (1 << shift) for v in values]
        if all(float(i).is_integer() for i in ints):
            return shift if max(abs(i) for i in ints) <= INT8_MAX_MAGNITUDE else None
    return None
