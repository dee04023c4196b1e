"""The registry of level-set families: adding a level set is one :func:`register_family` call.

A family builds the ``2^bits`` unit values of each bit width it supports; :func:`get_level_set` turns a family name,
bits and options into the frozen :class:`~.level_set.LevelSet` every other layer takes, and :func:`from_id` turns the
id stored in ops and checkpoints back into it.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .level_set import LevelSet


@dataclass(frozen=True)
class Family:
    """A registered family of level sets.

    Args:
        name (`str`): what users pass as ``PoTConfig(levels=...)``.
        build (`Callable[[int, bool], tuple[float, ...]]`): ``(bits, zero_level) -> values``, one per code.
        bits (`tuple[int, ...]`): the bit widths it exists at.
        default_offset (`dict[int, bool]`): per bit width, whether the measured-best variant stores offsets.
        has_zero_variant (`bool`): whether ``zero_level=False`` selects a table without the zero level.
        description (`str`): one line for docs, errors and model cards.
    """

    name: str
    build: Callable[[int, bool], tuple[float, ...]]
    bits: tuple[int, ...]
    default_offset: dict
    has_zero_variant: bool = False
    description: str = ""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Registers ``family`` (replacing one of the same name) and returns it."""
    _FAMILIES[family.name] = family
    get_level_set.cache_clear()
    return family


def families() -> list[str]:
    """Names of the registered families."""
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The family ``name``; a `ValueError` naming the valid choices when there is none."""
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"Unknown PoT level set {name!r}; choose one of {families()} (see docs/levels.md).")
    return _FAMILIES[name]


@lru_cache(maxsize=None, typed=True)  # typed: 4.0 and True must not hit the cached 4 and 1
def get_level_set(name: str, bits: int, zero_level: bool | None = None, offset: bool | None = None) -> LevelSet:
    """The level set of family ``name`` at ``bits``.

    Args:
        name (`str`): a registered family (``"pot"``, ``"sp2"``, ``"int"``, ...).
        bits (`int`): bits per code.
        zero_level (`bool`, *optional*): families with a zero-less variant (``pot``) build it for `False`;
            `None` means the family's default (with the zero level).
        offset (`bool`, *optional*): store a per-group offset; `None` means the family's measured default.

    Raises:
        ValueError: unknown family, bits the family does not exist at, or ``zero_level=False`` for a family
            without that variant.
    """
    family = get_family(name)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in family.bits:
        raise ValueError(f"Level set {name!r} exists at bits {list(family.bits)}, not {bits!r}.")
    if zero_level is False and not family.has_zero_variant:
        raise ValueError(f"Level set {name!r} has no variant without a zero level; leave zero_level unset (None).")
    zero = True if zero_level is None else zero_level
    use_offset = family.default_offset.get(bits, False) if offset is None else bool(offset)
    return LevelSet(
        family=name,
        bits=bits,
        values=family.build(bits, zero),
        offset=use_offset,
        variant="" if zero else "nozero",
        description=family.description,
    )


def from_id(level_id: str) -> LevelSet:
    """The level set of an id such as ``"pot:4"`` or ``"sp2:3:offset"`` (as stored in ops and checkpoints).

    Raises:
        ValueError: a malformed id, or one naming a family this version does not know (upgrade optimum_pot).
    """
    parts = level_id.split(":") if isinstance(level_id, str) else []
    flags = set(parts[2:])
    if len(parts) < 2 or not parts[1].isdigit() or not flags <= {"nozero", "offset"}:
        raise ValueError(f"Malformed PoT level-set id {level_id!r}; expected 'family:bits[:nozero][:offset]'.")
    if parts[0] not in _FAMILIES:
        raise ValueError(
            f"This checkpoint uses PoT level set {parts[0]!r}, which this optimum_pot does not know (it knows "
            f"{families()}). Upgrade optimum_pot (pip install -U optimum-pot)."
        )
    return get_level_set(parts[0], int(parts[1]), False if "nozero" in flags else None, "offset" in flags)
