"""Lets ``torch.compile`` see the Triton kernels behind ``optimum_pot::pot_linear`` (and ``pot_linear_infer``).

``pot_linear`` is a ``custom_op``, which ``torch.compile`` treats as opaque: compiled models would call it as a black
box, and Inductor could not schedule or fuse the Triton kernels it dispatches to. This module registers a rule for
AOTAutograd's functionalization pass (``FunctionalTensorMode``): when the op would run on the Triton backend, the
rule replaces it by ``optimum_pot::pot_linear_triton``, a ``triton_op`` that decomposes further into the kernel
launches, for every level set (the level-set id is passed through; the kernels read its descriptors). Autograd is
untouched (the rule runs below it, so ``pot_linear``'s backward formula still applies). The same rule serves
``pot_linear_infer``, the no-autograd twin that compiled inference (``PoTLinear`` under ``no_grad``) records. Every
other case (other backends, ``torch.export``, the CPU interpreter) keeps the op whole.
"""

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from ...format.registry import from_id
from ...library.ops import pot_linear, resolve
from .tables import unsupported_reason


def _runs_on_triton(x: torch.Tensor, backend: str, kernel) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        if resolve("cuda", backend) is not kernel:
            return False
    except RuntimeError:
        return False  # unavailable backend: keep the op, which raises the registry's clear error when it runs
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    from . import launch

    # torch.export keeps triton ops whole by design; the interpreter cannot trace launches.
    return not custom_triton_ops_decomposition_disabled() and not launch.INTERPRETED


def register_decomposition(kernel) -> None:
    """Installs the rule; ``kernel`` is the registered Triton entry (what the registry resolves to on CUDA)."""

    def decompose(mode, func, types, args, kwargs):
        x, packed, scale, offset, bias, levels, group_size, in_features, backend = args
        if _runs_on_triton(x, backend, kernel) and unsupported_reason(from_id(levels)) is None:
            with mode:
                return torch.ops.optimum_pot.pot_linear_triton(
                    x, packed, scale, offset, bias, levels, group_size, in_features
                )
        return mode.__torch_dispatch__(func, types, args, kwargs)

    pot_linear.register_torch_dispatch(FunctionalTensorMode, decompose)
    torch.library.register_torch_dispatch("optimum_pot::pot_linear_infer", FunctionalTensorMode, decompose)
