"""CPU kernels of ``optimum_pot::pot_linear``: ``backend="cpu"`` (fp32 activations), ``"cpu_int8"`` (int8
activations for decode-sized inputs) and the CPU's ``"auto"`` (``cpu_int8`` where the CPU runs it, else ``cpu``).

All three are the C++ torch operator ``optimum_pot_cpu::linear`` (see docs/cpu_kernel.md). Registering is cheap:
the operator is compiled on the first call, never at import (see ``build.py``).
"""

from ...library.ops import register_kernel
from .build import KernelBuildError, load_kernel, load_op
from .linear import (
    bf16_path,
    int8_path,
    is_available,
    num_threads,
    pot_linear_cpu,
    pot_linear_cpu_auto,
    pot_linear_cpu_int8,
    set_num_threads,
)

register_kernel("cpu", "cpu", pot_linear_cpu, is_available)
register_kernel("cpu", "cpu_int8", pot_linear_cpu_int8, is_available)
register_kernel("cpu", "auto", pot_linear_cpu_auto, is_available)

__all__ = [
    "KernelBuildError",
    "bf16_path",
    "int8_path",
    "is_available",
    "load_kernel",
    "load_op",
    "num_threads",
    "pot_linear_cpu",
    "pot_linear_cpu_auto",
    "pot_linear_cpu_int8",
    "set_num_threads",
]
