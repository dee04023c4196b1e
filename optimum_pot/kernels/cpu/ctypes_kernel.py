"""``ctypes`` binding of the kernels' C ABI (``pot_api.h``), for the kernel-only build.

Not the runtime path (that is the torch operator, :mod:`.linear`): it calls the kernel with a Python wrapper and
``ctypes``, which is how the kernel was called before it became an operator. It serves the portable-build and cache
tests and the "ctypes" column of the dispatch comparison in ``bench/cpu_kernels.py``.
"""

import ctypes

import torch

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class PotArgs(ctypes.Structure):
    """Mirror of ``struct PotArgs`` (checked against ``pot_cpu_args_size()`` when a library is bound)."""

    _fields_ = [
        ("x", _P), ("M", _I64), ("K", _I64), ("N", _I64), ("packed", _P), ("row_bytes", _I64), ("scale", _P),
        ("offset", _P), ("G", _I64), ("group_size", _I64), ("values", _P), ("bits", _I32), ("int8_shift", _I32),
        ("bias", _P), ("y", _P), ("threads", _I32), ("reserved", _I32),
    ]  # fmt: skip


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declares the C signatures on ``lib`` (a kernel or operator library) and checks the struct layout."""
    args = ctypes.POINTER(PotArgs)
    for name in ("pot_cpu_linear", "pot_cpu_linear_i8", "pot_cpu_i8_supported", "pot_cpu_check",
                 "pot_cpu_check_linear"):  # fmt: skip
        getattr(lib, name).argtypes, getattr(lib, name).restype = [args], ctypes.c_int
    lib.pot_cpu_decode.argtypes, lib.pot_cpu_decode.restype = [args, _I64, _I64, _P], ctypes.c_int
    lib.pot_cpu_status_message.argtypes, lib.pot_cpu_status_message.restype = [ctypes.c_int], ctypes.c_char_p
    lib.pot_cpu_args_size.restype = _I64
    if lib.pot_cpu_args_size() != ctypes.sizeof(PotArgs):
        raise RuntimeError("ctypes PotArgs does not match pot_api.h; update ctypes_kernel.PotArgs")
    return lib


def make_args(x, packed, scale, offset, bias, values, bits, int8_shift, group_size, in_features, y, threads):
    """``PotArgs`` over contiguous tensors (``values``: float32 ``[2^bits]``); keeps nothing alive itself."""

    def ptr(t):
        return None if t is None else t.data_ptr()

    return PotArgs(
        ptr(x), 0 if x is None else x.numel() // in_features, in_features, packed.shape[0], ptr(packed),
        packed.shape[1], ptr(scale), ptr(offset), scale.shape[1], group_size, ptr(values), bits,
        -1 if int8_shift is None else int8_shift, ptr(bias), ptr(y), threads, 0,
    )  # fmt: skip


_VALUES: dict[str, torch.Tensor] = {}  # level set id -> float32 unit values (built once, as the old wrapper did)


def linear(lib, x, packed, scale, offset, bias, level_set, group_size, in_features, int8=False, threads=1):
    """``x [M, K] @ W.T (+ bias)`` through the C ABI (one pass; any M), fp32; raises on a refused argument."""
    values = _VALUES.get(level_set.id)
    if values is None:
        values = _VALUES.setdefault(level_set.id, torch.tensor(level_set.values, dtype=torch.float32))
    # Contiguous tensors held in locals: the struct takes raw pointers, which must outlive the call.
    x = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    packed, scale = packed.contiguous(), scale.contiguous()
    offset = None if offset is None else offset.contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], packed.shape[0])
    args = make_args(x, packed, scale, offset, bias, values, level_set.bits, level_set.int8_shift, group_size,
                     in_features, y, threads)  # fmt: skip
    status = (lib.pot_cpu_linear_i8 if int8 else lib.pot_cpu_linear)(ctypes.byref(args))
    if status != 0:
        raise ValueError(f"kernel refused its arguments: {lib.pot_cpu_status_message(status).decode()}")
    return y
