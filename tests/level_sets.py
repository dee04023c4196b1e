"""Every registered level set, for the tests parametrised over level sets (adding a family adds its cases)."""

from optimum_pot.format import families as _families  # noqa: F401  (registers the built-in families)
from optimum_pot.format.registry import _FAMILIES, get_level_set


def all_level_sets():
    """Each registered family at each of its bits, with and without offsets (and ``pot`` without its zero)."""
    out = []
    for name, family in sorted(_FAMILIES.items()):
        for bits in family.bits:
            for offset in (False, True):
                out.append(get_level_set(name, bits, offset=offset))
            if family.has_zero_variant:
                out.append(get_level_set(name, bits, zero_level=False))
    return out


def default_level_sets():
    """Each registered family at each of its bits, with its default options (the sets users get)."""
    return [get_level_set(name, bits) for name, family in sorted(_FAMILIES.items()) for bits in family.bits]


ALL_LEVEL_SETS = all_level_sets()
DEFAULT_LEVEL_SETS = default_level_sets()


def ids(level_set) -> str:
    return level_set.id
