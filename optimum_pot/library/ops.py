"""The ``optimum_pot::pot_linear`` op, declared once.

Implementations live in a registry keyed by ``(device_type, backend)``; the reference is always available and
kernels (``kernels/cpu``, ``kernels/triton``) register themselves beside it. ``backend="auto"`` takes the first
available kernel of :data:`AUTO_PREFERENCE` for the tensor's device and falls back to the reference.
Registering is import-time cheap: kernels are compiled on first use, never at import.
"""

from collections.abc import Callable

import torch

from ..format.levels import expand_groups
from .reference import pot_linear_reference, unit_weight

BACKENDS = ("auto", "reference", "cpu", "cpu_int8", "triton")
AUTO_PREFERENCE = {"cpu": ("cpu",), "cuda": ("triton",)}

# (device_type, backend) -> (kernel, is_available)
_KERNELS: dict[tuple[str, str], tuple[Callable, Callable[[], bool]]] = {}
# backend -> fn(device_type) explaining why it cannot run there (the fix to name in the error)
_REASONS: dict[str, Callable[[str], str | None]] = {}


def register_kernel(device_type: str, backend: str, fn: Callable, is_available: Callable[[], bool] = lambda: True):
    """Registers ``fn`` (same signature as :func:`pot_linear_reference`) as ``backend`` on ``device_type``."""
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
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    zero_level: bool,
    backend: str,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` for a packed PoT weight ``W`` (``[N, K]``); ``x`` ``[..., K]`` → ``[..., N]``."""
    return _run(x, packed, scale, bias, bits, group_size, in_features, zero_level, backend)


def _run(x, packed, scale, bias, bits, group_size, in_features, zero_level, backend):
    """The body of both ops: the kernel ``backend`` selects for ``x``'s device."""
    return resolve(x.device.type, backend)(x, packed, scale, bias, bits, group_size, in_features, zero_level)


def _fake(x, packed, scale, bias, bits, group_size, in_features, zero_level, backend):
    """Output of both ops for fake/meta tensors: ``[..., N]``."""
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


pot_linear.register_fake(_fake)


def _setup_context(ctx, inputs, output):
    x, packed, scale, bias, bits, group_size, in_features, zero_level, _ = inputs
    ctx.save_for_backward(x, packed, scale)
    ctx.meta = (bits, group_size, in_features, zero_level, bias is not None)


def _backward(ctx, grad):
    """Gradients for ``x`` (LoRA and QAT train through a frozen packed layer), ``scale`` and ``bias``."""
    x, packed, scale = ctx.saved_tensors
    bits, group_size, in_features, zero_level, has_bias = ctx.meta
    unit = unit_weight(packed, bits, in_features, zero_level)  # [N, K]
    grad_x = grad_scale = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = (expand_groups(scale.float(), group_size, in_features) * unit).to(grad.dtype)
        grad_x = grad @ w
    if ctx.needs_input_grad[2]:
        g2 = grad.reshape(-1, grad.shape[-1]).float()  # [M, N]
        gw = g2.t() @ x.reshape(-1, x.shape[-1]).float()  # [N, K]
        per_col = gw * unit
        pad = -in_features % group_size
        per_col = torch.nn.functional.pad(per_col, (0, pad))
        grad_scale = per_col.reshape(per_col.shape[0], -1, group_size).sum(-1).to(scale.dtype)  # [N, G]
    if has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, grad_scale, grad_bias, None, None, None, None, None


pot_linear.register_autograd(_backward, setup_context=_setup_context)


# Inference twin of the op: same schema and kernels, no autograd formula. A custom_op's Python autograd wrapper runs
# on every call, even under no_grad (~35 us a call, measured), which dominates small decode-time layers inside a
# torch.compile graph; this op dispatches straight to the kernel (~8 us). PoTLinear uses it only when no gradient
# is needed, so the autograd fallback (a warning, no graph) is never reached.
_INFER_LIB = torch.library.Library("optimum_pot", "FRAGMENT")
_INFER_LIB.define(
    "pot_linear_infer(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int bits, int group_size, "
    "int in_features, bool zero_level, str backend) -> Tensor"
)

_INFER_LIB.impl("pot_linear_infer", _run, "CompositeExplicitAutograd")
torch.library.register_fake("optimum_pot::pot_linear_infer", _fake)

pot_linear_infer = torch.ops.optimum_pot.pot_linear_infer.default
