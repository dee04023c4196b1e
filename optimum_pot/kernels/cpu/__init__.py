"""CPU kernel for ``optimum_pot::pot_linear`` (``backend="cpu"``, the default on CPU under ``"auto"``, and the
opt-in integer-activation ``backend="cpu_int8"``).

Registering is cheap: the C++ source is compiled on the first call, never at import (see ``build.py``).
"""

from ...library.ops import register_kernel
from .build import KernelBuildError, load_library
from .linear import int8_path, is_available, num_threads, pot_linear_cpu, pot_linear_cpu_int8, set_num_threads

register_kernel("cpu", "cpu", pot_linear_cpu, is_available)
register_kernel("cpu", "cpu_int8", pot_linear_cpu_int8, is_available)

__all__ = [
    "KernelBuildError",
    "int8_path",
    "is_available",
    "load_library",
    "num_threads",
    "pot_linear_cpu",
    "pot_linear_cpu_int8",
    "set_num_threads",
]
