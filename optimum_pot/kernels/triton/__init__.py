"""The ``triton`` backend of ``optimum_pot::pot_linear``: GPU kernels with PoTPTQ's exponent-addition decode.

Registers itself with :mod:`optimum_pot.library.ops` for CUDA tensors (picked by ``backend="auto"`` there) and for
CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter; slow, used by the tests), and lets
``torch.compile`` trace the op into the kernels on CUDA (:mod:`.tracing`). Importing this package imports neither
triton nor CUDA: the kernels are imported, and compiled, on the first call.
"""

import importlib.util
import os

from ...library.ops import register_kernel, register_unavailable_reason
from .tables import unsupported_reason
from .tracing import register_decomposition

INSTALL_HINT = "backend='triton' needs `pip install triton`"


def triton_installed() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` must be set before they load)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_available() -> bool:
    """The triton backend can run CUDA tensors (queried at dispatch, never at import)."""
    import torch

    return triton_installed() and torch.cuda.is_available()


def cpu_available() -> bool:
    """The triton backend can run CPU tensors: only through the interpreter."""
    return triton_installed() and interpreter_enabled()


def unavailable_reason(device_type: str) -> str | None:
    """Why ``backend="triton"`` cannot run on ``device_type`` (``None`` when it can), naming the fix."""
    if not triton_installed():
        return INSTALL_HINT + "."
    if device_type == "cpu" and not interpreter_enabled():
        return (
            "backend='triton' runs on CUDA tensors; on the CPU only through Triton's (slow) interpreter: set "
            "TRITON_INTERPRET=1 before the first call, or use backend='auto'."
        )
    if device_type not in ("cpu", "cuda"):
        return f"backend='triton' supports CUDA tensors (and CPU ones with TRITON_INTERPRET=1), not {device_type}."
    return None


def pot_linear_triton(x, packed, scale, offset, bias, level_set, group_size, in_features):
    """Kernel entry registered with the op registry: calls the ``optimum_pot::pot_linear_triton`` triton_op.

    Every registered level set decodes in the kernels; one whose terms the descriptors cannot hold exactly
    (:func:`.tables.unsupported_reason`, beyond float32's exponent range: no registered family) uses the reference.
    """
    try:
        from . import launch  # noqa: F401  (defines the triton_op on first use)
    except ImportError as err:
        raise RuntimeError(f"{INSTALL_HINT} (importing it failed: {err}).") from err
    import torch

    if unsupported_reason(level_set) is not None:
        from ...library.reference import pot_linear_reference

        return pot_linear_reference(x, packed, scale, offset, bias, level_set, group_size, in_features)
    return torch.ops.optimum_pot.pot_linear_triton(
        x, packed, scale, offset, bias, level_set.id, group_size, in_features
    )


# Lambdas: availability is looked up at dispatch time (and can be patched in tests).
register_kernel("cuda", "triton", pot_linear_triton, lambda: cuda_available())
register_kernel("cpu", "triton", pot_linear_triton, lambda: cpu_available())
register_unavailable_reason("triton", unavailable_reason)
register_decomposition(pot_linear_triton)  # torch.compile traces pot_linear into the kernels on CUDA
