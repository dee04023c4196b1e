"""The built-in level-set families (the measurements behind each table: docs/levels.md).

* ``pot``: single-term, ``±2^-e``: a sign bit and ``bits-1`` exponent bits (format version 1's only level set;
  its checkpoints decode bit-exact with it). With the zero level, the all-ones exponent means 0.
* ``sp2``: two-term non-uniform ("sum of two powers"): levels spaced like a normal distribution's quantiles (as NF4),
  each a sum of at most two signed powers of two.
* ``int``: two's-complement integers ``-2^(b-1) … 2^(b-1)-1``, each a sum of at most two signed powers of two at
  2-4 bits (``7 = 8 - 1``, ``-5 = -4 - 1``); with the per-group offset this is the uniform asymmetric grid.
"""

from .registry import Family, register_family


def pot_values(bits: int, zero_level: bool) -> tuple[float, ...]:
    """Code ``p << (bits-1) | e`` → ``(-1)^p · 2^-e``; with ``zero_level`` the all-ones ``e`` is 0."""
    n_e = 1 << (bits - 1)
    out = []
    for code in range(1 << bits):
        e, sign = code & (n_e - 1), code >> (bits - 1)
        mag = 0.0 if zero_level and e == n_e - 1 else 2.0**-e
        out.append(-mag if sign else mag)
    return tuple(out)


def int_values(bits: int, zero_level: bool) -> tuple[float, ...]:
    """Code ``c`` → ``c - 2^(bits-1)`` (offset binary)."""
    half = 1 << (bits - 1)
    return tuple(float(c - half) for c in range(1 << bits))


# Two-term tables, ascending, chosen by measurement (docs/levels.md, bench/levels.py): integers up to 128 (the int8
# CPU kernel's limit), each a sum of at most two signed powers of two (62 = 64 - 2, 18 = 16 + 2, 56 = 64 - 8).
SP2_TABLES = {
    4: (-80.0, -62.0, -48.0, -36.0, -28.0, -18.0, -10.0, -3.0, 5.0, 12.0, 20.0, 28.0, 36.0, 48.0, 62.0, 80.0),
    3: (-56.0, -36.0, -20.0, -6.0, 6.0, 20.0, 36.0, 56.0),
    2: (-10.0, -3.0, 3.0, 10.0),
}


def sp2_values(bits: int, zero_level: bool) -> tuple[float, ...]:
    return SP2_TABLES[bits]


POT = register_family(
    Family(
        name="pot",
        build=pot_values,
        bits=(2, 3, 4),
        default_offset={},
        has_zero_variant=True,
        description="single-term power of two, ±2^-e (one shift per weight)",
    )
)
INT = register_family(
    Family(
        name="int",
        build=int_values,
        bits=(2, 3, 4),
        default_offset={2: True, 3: True, 4: True},
        description="integers -2^(b-1)..2^(b-1)-1, each a sum of at most two powers of two (uniform grid)",
    )
)
SP2 = register_family(
    Family(
        name="sp2",
        build=sp2_values,
        bits=(2, 3, 4),
        default_offset={2: True, 3: True, 4: True},
        description="non-uniform sums of at most two powers of two (two shifts and an add per weight)",
    )
)
