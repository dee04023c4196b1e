"""Kernels for ``optimum_pot::pot_linear``; each subpackage registers itself with the op on import (cheaply)."""

from . import cpu as _cpu  # noqa: F401  (registers backend="cpu"; compiled on first use)
from . import triton as _triton  # noqa: F401  (registers backend="triton"; triton itself loads on first use)
