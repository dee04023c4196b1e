"""The ``optimum_pot::pot_linear`` op, declared once.

Implementations live in a registry keyed by ``(device_type, backend)``; the reference is always available and
kernels (``kernels/cpu``, ``kernels/triton``) register themselves beside it. ``backend="auto"`` takes the first
available kernel of :data:`AUTO_PREFERENCE` for the tensor's device and falls back to the reference.
Registering is import-time cheap: kernels are compiled on first use, never at import.
"""

from collections.abc import Callable

import torch

from ..format.groups import expand_groups, group_sum
from ..format.levels import unit_values
from ..format.packing import unpack
from ..format.registry import from_id
from .checks import check_activation, check_packed
from .reference import pot_linear_reference

BACKENDS = ("auto", "reference", "cpu", "cpu_int8", "triton")
# Backends "auto" tries, in order, per device; a kernel registered under "auto" itself (the CPU's: int8 activations
# for decode-sized inputs where the CPU runs them, else exact fp32) chooses per input.
AUTO_PREFERENCE = {"cpu": ("auto", "cpu"), "cuda": ("triton",)}

# (device_type, backend) -> (kernel, is_available)
_KERNELS: dict[tuple[str, str], tuple[Callable, Callable[[], bool]]] = {}
# backend -> fn(device_type) explaining why it cannot run there (the fix to name in the error)
_REASONS: dict[str, Callable[[str], str | None]] = {}


def register_kernel(device_type: str, backend: str, fn: Callable, is_available: Callable[[], bool] = lambda: True):
    """Registers ``fn`` (same signature as :func:`pot_linear_reference`) as ``backend`` on ``device_type``.

    A kernel takes ``(x, packed, scale, offset, bias, level_set, group_size, in_features)`` and must handle every
    registered level set, or call the reference for those it does not (tests/test_conformance.py checks it).
    """
    _KERNELS[(device_type, backend)] = (fn, is_available)


def register_unavailable_reason(backend: str, fn: Callable[[str], str | None]):
    """Registers ``fn(device_type)``: why ``backend`` cannot run on that device, naming the fix (or ``None``)."""
    _REASONS[backend] = fn


def available_backends(device_type: str) -> list[str]:
    """Backends usable for tensors on ``device_type`` (``reference`` always is)."""
    found = [b for (d, b), (_, ok) in _KERNELS.items() if d == device_type and ok()]
    return ["reference", *found]


def check_backend(backend: str) -> None:
    """Raises ``ValueError`` naming the valid values when ``backend`` is not one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")


def resolve(device_type: str, backend: str) -> Callable:
    """The implementation ``backend`` selects for tensors on ``device_type`` (raises naming the fix if none)."""
    if backend == "reference":
        return pot_linear_reference
    if backend == "auto":
        for name in AUTO_PREFERENCE.get(device_type, ()):
            entry = _KERNELS.get((device_type, name))
            if entry is not None and entry[1]():
                return entry[0]
        return pot_linear_reference
    entry = _KERNELS.get((device_type, backend))
    if entry is None or not entry[1]():
        reason = _REASONS[backend](device_type) if backend in _REASONS else None
        raise RuntimeError(
            f"PoT backend {backend!r} is not available for {device_type} tensors; available there: "
            f"{available_backends(device_type)}. {reason or ''} Use backend='auto' (or 'reference'), or move the "
            "model to a device the backend supports."
        )
    return entry[0]


@torch.library.custom_op("optimum_pot::pot_linear", mutates_args=())
def pot_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    levels: str,
    group_size: int,
    in_features: int,
    backend: str,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a packed weight ``W`` (``[N, K]``) of level set ``levels`` (its id);
    ``x`` ``[..., K]`` → ``[..., N]``."""
    return _run(x, packed, scale, offset, bias, levels, group_size, in_features, backend)


def _check(x, packed, scale, offset, bias, level_set, group_size, in_features):
    check_packed(packed, scale, offset, bias, level_set, group_size, in_features)
    check_activation(x, in_features, packed.shape[0], packed.device)


def _run(x, packed, scale, offset, bias, levels, group_size, in_features, backend):
    """The body of both ops: checks, then the kernel ``backend`` selects for ``x``'s device."""
    level_set = from_id(levels)
    _check(x, packed, scale, offset, bias, level_set, group_size, in_features)
    kernel = resolve(x.device.type, backend)
    return kernel(x, packed, scale, offset, bias, level_set, group_size, in_features)


def _fake(x, packed, scale, offset, bias, levels, group_size, in_features, backend):
    """Output of both ops for fake/meta tensors: ``[..., N]`` (shapes checked like the real call)."""
    _check(x, packed, scale, offset, bias, from_id(levels), group_size, in_features)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


pot_linear.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    x, packed, scale, offset, bias, levels, group_size, in_features, _ = inputs
    ctx.save_for_backward(x, packed, scale, offset)
    ctx.meta = (levels, group_size, in_features, bias is not None, offset is not None)


def _backward(ctx, grad):
    """Gradients for ``x`` (LoRA and QAT train through a frozen packed layer), ``scale``, ``offset`` and ``bias``."""
    x, packed, scale, offset = ctx.saved_tensors
    levels, group_size, in_features, has_bias, has_offset = ctx.meta
    level_set = from_id(levels)
    unit = unit_values(unpack(packed, level_set.bits, in_features), level_set)  # [N, K]
    grad_x = grad_scale = grad_offset = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = expand_groups(scale.float(), group_size, in_features) * unit
        if has_offset:
            w = w + expand_groups(offset.float(), group_size, in_features)
        grad_x = grad @ w.to(grad.dtype)
    if ctx.needs_input_grad[2] or (has_offset and ctx.needs_input_grad[3]):
        g2 = grad.reshape(-1, grad.shape[-1]).float()  # [M, N]
        x2 = x.reshape(-1, x.shape[-1]).float()  # [M, K]
        if ctx.needs_input_grad[2]:
            gw = g2.t() @ x2  # [N, K]
            grad_scale = group_sum(gw * unit, group_size).to(scale.dtype)  # [N, G]
        if has_offset and ctx.needs_input_grad[3]:
            grad_offset = (g2.t() @ group_sum(x2, group_size)).to(offset.dtype)  # [N, G]
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, grad_scale, grad_offset, grad_bias, None, None, None, None


pot_linear.register_autograd(_backward, setup_context=_setup_context)


# Inference twin of the op: same schema and kernels, no autograd formula. A custom_op's Python autograd wrapper runs
# on every call, even under no_grad (~35 us a call, measured), which dominates small decode-time layers inside a
# torch.compile graph; this op dispatches straight to the kernel (~8 us). PoTLinear uses it only when no gradient
# is needed, so the autograd fallback (a warning, no graph) is never reached.
_INFER_LIB = torch.library.Library("optimum_pot", "FRAGMENT")
_INFER_LIB.define(
    "pot_linear_infer(Tensor x, Tensor packed, Tensor scale, Tensor? offset, Tensor? bias, str levels, "
    "int group_size, int in_features, str backend) -> Tensor"
)

_INFER_LIB.impl("pot_linear_infer", _run, "CompositeExplicitAutograd")
torch.library.register_fake("optimum_pot::pot_linear_infer", _fake)

pot_linear_infer = torch.ops.optimum_pot.pot_linear_infer.default
