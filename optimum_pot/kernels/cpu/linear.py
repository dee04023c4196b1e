"""The ``cpu`` implementation of ``optimum_pot::pot_linear``: packed PoT weights decoded on the fly (C++ kernel).

Few activation rows (decode, ``M <= GEMM_MIN_M``): one pass over the packed weight, decoding and accumulating
in registers, so the weight is streamed at 2-4 bits per value. Many rows (prefill): a tile of rows is decoded to
fp32 and multiplied by the BLAS GEMM, whose cost then dominates the decode. ``backend="cpu_int8"`` swaps the
few-rows path for int8 activations and integer accumulation (``pot_i8.cpp``).
"""

import os
import warnings

import torch

from ...library.reference import pot_linear_reference
from .build import KernelBuildError, load_library

GEMM_MIN_M = 12  # measured (4096x4096, 1 thread): direct 13 ms vs tiled 19 ms at M=12, 20 vs 14 at M=16
TILE_FLOATS = 1 << 22  # decoded tile of 16 MiB: stays in L3 while the GEMM reads it; few GEMM calls

_LIB: list = []  # the loaded library, once built
_FAILED: list[str] = []  # the build error, once it happened: later calls go straight to the reference


_THREADS: list[int] = []  # set_num_threads() override; empty: follow $OPTIMUM_POT_NUM_THREADS, else torch
_ENV_THREADS: list[int | None] = []  # $OPTIMUM_POT_NUM_THREADS, read once at the first call (not per call)


def set_num_threads(n: int | None) -> None:
    """Threads of the PoT CPU kernel (``None``: back to ``$OPTIMUM_POT_NUM_THREADS``, else
    ``torch.get_num_threads()``, the default).

    Decoding a small model is often fastest with torch's own ops on one thread (tiny attention/norm ops pay
    OpenMP synchronisation) and the PoT kernel on all cores: ``torch.set_num_threads(1); set_num_threads(2)``.

    Raises:
        ValueError: ``n`` is not a positive integer or ``None``.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"set_num_threads: n must be a positive integer or None, got {n!r}.")
    _THREADS[:] = [] if n is None else [n]


def _env_threads() -> int | None:
    env = os.environ.get("OPTIMUM_POT_NUM_THREADS")
    if env is None or env == "":
        return None
    if env.isdigit() and int(env) > 0:
        return int(env)
    warnings.warn(
        f"optimum_pot: ignoring OPTIMUM_POT_NUM_THREADS={env!r}; set it to a positive integer (or unset it to follow "
        "torch.get_num_threads()).",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


def num_threads() -> int:
    """Threads the PoT CPU kernel uses for the next call."""
    if _THREADS:
        return _THREADS[0]
    if not _ENV_THREADS:
        _ENV_THREADS.append(_env_threads())
    return _ENV_THREADS[0] or torch.get_num_threads()


def is_available() -> bool:
    """Cheap: never compiles. ``False`` only after a build failed in this process."""
    return not _FAILED


def _library():
    if _LIB:
        return _LIB[0]
    if _FAILED:
        return None
    try:
        _LIB.append(load_library())
        return _LIB[0]
    except KernelBuildError as err:
        _FAILED.append(str(err))
        warnings.warn(
            f"optimum_pot: the CPU PoT kernel could not be built ({err}); falling back to the slow reference "
            "implementation. Install a C++ compiler with OpenMP (e.g. `apt-get install g++`) to get it.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _gemm(lib, x2, packed, scale, bias, bits, group_size, in_features, zero_level):
    """``x2 [M, K]`` fp32 against the weight decoded tile by tile into a reused fp32 buffer."""
    n, k = packed.shape[0], in_features
    kp = -(-k // 64) * 64
    xk = torch.nn.functional.pad(x2, (0, kp - k)) if kp != k else x2  # [M, Kp]: rows padded to whole chunks
    if lib.pot_cpu_fast_layout(group_size):
        xk = xk.view(-1, kp // 64, 8, 8).transpose(-1, -2).reshape(-1, kp)  # natural -> chunk order
    tile = max(8, min(n, TILE_FLOATS // kp))
    buf = torch.empty(tile, kp)
    if tile >= n:  # one tile (every SmolLM2-sized layer): multiply straight into [M, N], no transposed copy
        lib.pot_cpu_decode(
            packed.data_ptr(), packed.shape[1], scale.data_ptr(), scale.shape[1], group_size, k, 0, n, bits,
            int(zero_level), buf.data_ptr(), num_threads(),
        )  # fmt: skip
        return torch.addmm(bias, xk, buf[:n].t()) if bias is not None else torch.mm(xk, buf[:n].t())
    out = torch.empty(n, x2.shape[0])  # [N, M]: row tiles are contiguous
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        lib.pot_cpu_decode(
            packed.data_ptr(),
            packed.shape[1],
            scale.data_ptr(),
            scale.shape[1],
            group_size,
            k,
            n0,
            n1,
            bits,
            int(zero_level),
            buf.data_ptr(),
            num_threads(),
        )
        torch.mm(buf[: n1 - n0], xk.t(), out=out[n0:n1])
    y = out.t()
    return (y + bias) if bias is not None else y.contiguous()


def _linear(x, packed, scale, offset, bias, level_set, group_size, in_features, int8: bool) -> torch.Tensor:
    lib = _library()
    if lib is None or level_set.family != "pot" or offset is not None:  # TODO(levels): general tables in C++
        return pot_linear_reference(x, packed, scale, offset, bias, level_set, group_size, in_features)
    bits, zero_level = level_set.bits, level_set.zero_level
    # Every conversion is skipped when not needed: at decode time this wrapper's overhead is per layer and token.
    x2 = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()  # [..., K]
    if not packed.is_contiguous():
        packed = packed.contiguous()
    if scale.dtype != torch.float16 or not scale.is_contiguous():
        scale = scale.to(torch.float16).contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    m, n = x2.numel() // in_features, packed.shape[0]
    if m > GEMM_MIN_M:  # prefill: both backends decode a tile to fp32 and call the GEMM
        y = _gemm(lib, x2.reshape(m, in_features), packed, scale, bias, bits, group_size, in_features, zero_level)
        y = y.view(x.shape[:-1] + (n,))
    else:
        y = torch.empty(x.shape[:-1] + (n,))
        fn = lib.pot_cpu_linear_i8 if int8 else lib.pot_cpu_linear
        fn(
            x2.data_ptr(), m, in_features, packed.data_ptr(), packed.shape[1], scale.data_ptr(), scale.shape[1],
            group_size, n, bits, int(zero_level), None if bias is None else bias.data_ptr(), y.data_ptr(),
            num_threads(),
        )  # fmt: skip
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def int8_path(m: int, group_size: int, level_set) -> bool:
    """Whether ``backend="cpu_int8"`` rounds the activations of an ``[m, K]`` input to int8 (else it computes
    exactly like ``backend="cpu"``): decode-sized inputs, group sizes that are multiples of 64, an AVX2 CPU and a
    level set whose levels are small integers after one power-of-two shift (``LevelSet.int8_shift``)."""
    lib = _library()
    if lib is None or level_set.family != "pot" or level_set.offset:  # TODO(levels): general tables in C++
        return False
    return m <= GEMM_MIN_M and bool(lib.pot_cpu_i8_supported(level_set.bits, group_size))


def pot_linear_cpu(x, packed, scale, offset, bias, level_set, group_size, in_features) -> torch.Tensor:
    """Same contract as :func:`pot_linear_reference`; computes in fp32 and returns ``x.dtype``."""
    return _linear(x, packed, scale, offset, bias, level_set, group_size, in_features, int8=False)


def pot_linear_cpu_int8(x, packed, scale, offset, bias, level_set, group_size, in_features) -> torch.Tensor:
    """``backend="cpu_int8"``: like :func:`pot_linear_cpu`, but for few rows (decode, ``M <= GEMM_MIN_M``) the
    activations are quantised to int8 per row and 64 columns and the PoT weights applied as integer powers of two
    with int32 accumulation (group sizes that are multiples of 64, AVX2; otherwise, and for
    prefill, the fp32 path). Results differ from the reference by the activation rounding (~0.4 % of a chunk's
    max |x| per element)."""
    return _linear(x, packed, scale, offset, bias, level_set, group_size, in_features, int8=True)
