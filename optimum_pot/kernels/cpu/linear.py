"""The ``cpu``, ``cpu_int8`` and ``auto`` CPU kernels of ``optimum_pot::pot_linear``: each is one call of the C++
operator ``optimum_pot_cpu::linear`` (``pot_op.cpp``), so eager layers make one dispatch and ``torch.compile``,
``torch.export`` and AOTInductor packages see that operator in their graphs.

Few activation rows (decode, ``M <= GEMM_MIN_M``): one pass over the packed weight, decoding and accumulating in
registers, so the weight is streamed at 2-4 bits per value. Many rows (prefill): a tile of rows is decoded to fp32
and multiplied by the BLAS GEMM. ``cpu_int8`` swaps the few-rows path for int8 activations and integer accumulation
(``pot_i8.cpp``) and, on CPUs with AMX or AVX512-BF16, runs the many-rows GEMM in bfloat16 (:func:`bf16_path`);
``auto`` does the same where this CPU runs it, quietly (their accuracy cost: docs/cpu_kernel.md).
"""

import os
import warnings

import torch

from ...library.reference import pot_linear_reference
from ...utils.device import fast_bfloat16
from .build import KernelBuildError, load_op

GEMM_MIN_M = 12  # = pot_cpu_gemm_min_m() in pot_cpu.cpp (tests check it): rows up to which the one-pass kernels run
INT8_BLOCK = 64  # the integer path needs group sizes that are multiples of its 64-column activation blocks

_STATE: dict = {"lib": None, "error": None, "int8_warned": False}
_THREADS: list[int] = []  # set_num_threads() override; empty: follow $OPTIMUM_POT_NUM_THREADS, else torch
_ENV_THREADS: list[int | None] = []  # $OPTIMUM_POT_NUM_THREADS, read once (not per call)


def set_num_threads(n: int | None) -> None:
    """Threads of the PoT CPU kernel (``None``: back to ``$OPTIMUM_POT_NUM_THREADS``, else
    ``torch.get_num_threads()``, the default).

    Without an override the kernel runs on torch's own intra-op threads (the ones awake during inference). With
    one it runs on its own pool, which never waits for a descheduled thread: the better choice on a machine shared
    with other busy processes (docs/cpu_kernel.md, "Which threads").

    Raises:
        ValueError: ``n`` is not a positive integer or ``None``.
    """
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"set_num_threads: n must be a positive integer or None, got {n!r}.")
    _THREADS[:] = [] if n is None else [n]
    _push_threads()


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


def _thread_override() -> int | None:
    if _THREADS:
        return _THREADS[0]
    if not _ENV_THREADS:
        _ENV_THREADS.append(_env_threads())
    return _ENV_THREADS[0]


def num_threads() -> int:
    """Threads the PoT CPU kernel uses for the next call."""
    return _thread_override() or torch.get_num_threads()


def _push_threads() -> None:
    """Hands the override to the operator (0: it follows ``at::get_num_threads()`` on every call)."""
    if _STATE["lib"] is not None:
        _STATE["lib"].pot_op_set_threads(_thread_override() or 0)


def is_available() -> bool:
    """Cheap: never compiles. ``False`` only after the build or load failed in this process."""
    return _STATE["error"] is None


def _library():
    """The operator library's ``ctypes`` handle (built on the first call), or ``None`` after a failure (warned once,
    naming the cause: no compiler, a compile error, an untrusted cache, a load error)."""
    if _STATE["lib"] is not None or _STATE["error"] is not None:
        return _STATE["lib"]
    try:
        _STATE["lib"] = load_op()
    except KernelBuildError as err:
        _STATE["error"] = str(err)
        warnings.warn(
            f"optimum_pot: the CPU PoT kernel is unavailable: {err}. Falling back to the slow reference "
            "implementation for this process.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _push_threads()
    return _STATE["lib"]


@torch.compiler.assume_constant_result
def _op_ready() -> bool:
    """Whether the operator is loaded (loads it once); a constant to ``torch.compile``, which never traces a build."""
    return _library() is not None


def _cpu_runs_int8() -> bool:
    lib = _library()
    return lib is not None and lib.pot_cpu_has_avx2() == 1


@torch.compiler.assume_constant_result
def _int8_requested() -> bool:
    """``backend="cpu_int8"``: the integer path, or one warning naming why this CPU cannot run it."""
    if _cpu_runs_int8():
        return True
    if _library() is not None and not _STATE["int8_warned"]:
        _STATE["int8_warned"] = True
        warnings.warn(
            "optimum_pot: backend='cpu_int8' needs a CPU with AVX2, FMA and F16C (this one, or this build of the "
            "kernel, lacks them); computing with fp32 activations (backend='cpu') instead.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


@torch.compiler.assume_constant_result
def _int8_auto() -> bool:
    return _cpu_runs_int8()


@torch.compiler.assume_constant_result
def _bf16_gemm() -> bool:
    """Whether this CPU's bfloat16 GEMM beats fp32 (AMX or AVX512-BF16): then ``cpu_int8`` and ``auto`` prefill in
    bfloat16."""
    if "bf16" not in _STATE:
        _STATE["bf16"] = fast_bfloat16("cpu")
    return _STATE["bf16"]


def _call(x, packed, scale, offset, bias, level_set, group_size, in_features, int8: bool) -> torch.Tensor:
    # The format stores float16 scales and offsets; other dtypes (direct op callers) keep their precision through
    # the reference rather than being rounded to float16 by the kernel.
    if not _op_ready() or scale.dtype != torch.float16 or (offset is not None and offset.dtype != torch.float16):
        return pot_linear_reference(x, packed, scale, offset, bias, level_set, group_size, in_features)
    shift = -1 if level_set.int8_shift is None else level_set.int8_shift
    # The reduced-precision backends (int8 decode), and bfloat16 inputs (the reference decodes the weight in x's
    # dtype), take the bfloat16 prefill GEMM where it is fast.
    bf16 = (int8 or x.dtype == torch.bfloat16) and _bf16_gemm()
    return torch.ops.optimum_pot_cpu.linear(
        x, packed, scale, offset, bias, level_set.values, shift, group_size, in_features, int8, bf16
    )


def pot_linear_cpu(x, packed, scale, offset, bias, level_set, group_size, in_features) -> torch.Tensor:
    """``backend="cpu"``: same contract as :func:`pot_linear_reference`; computes in fp32 and returns ``x.dtype``
    (bfloat16 inputs with many rows on an AMX or AVX512-BF16 CPU: the GEMM in bfloat16, as the reference decodes it)."""
    return _call(x, packed, scale, offset, bias, level_set, group_size, in_features, False)


def pot_linear_cpu_int8(x, packed, scale, offset, bias, level_set, group_size, in_features) -> torch.Tensor:
    """``backend="cpu_int8"``: like :func:`pot_linear_cpu`, but where :func:`int8_path` holds the activations are
    rounded to int8 per row and 64 columns and the levels applied as small integers with int32 accumulation.
    Results then equal the reference on ``fake_quantize_activations_int8(x)`` (~0.4 % of a block's max |x| per
    element). Where :func:`bf16_path` holds (many rows, an AMX or AVX512-BF16 CPU), the GEMM multiplies bfloat16
    copies of ``x`` and of the decoded weight (fp32 accumulation, bfloat16 result). On a CPU without AVX2 it warns
    once and computes like ``backend="cpu"``."""
    return _call(x, packed, scale, offset, bias, level_set, group_size, in_features, _int8_requested())


def pot_linear_cpu_auto(x, packed, scale, offset, bias, level_set, group_size, in_features) -> torch.Tensor:
    """``backend="auto"`` on CPU: ``cpu_int8`` where this CPU runs it (int8 decode and, on AMX or AVX512-BF16 CPUs,
    bfloat16 prefill; their perplexity costs were measured < 1 %, bench/int8_accuracy.py), else ``cpu``; never warns."""
    return _call(x, packed, scale, offset, bias, level_set, group_size, in_features, _int8_auto())


# PoTLinear calls these directly under torch.compile / torch.export too: each is one C++ operator (or the
# reference's torch ops), so traced graphs hold optimum_pot_cpu::linear itself, with no Python-implemented op.
for _kernel in (pot_linear_cpu, pot_linear_cpu_int8, pot_linear_cpu_auto):
    _kernel.traceable = True


def int8_path(m: int, group_size: int, level_set) -> bool:
    """Whether ``backend="cpu_int8"`` (and ``"auto"``) round the activations of an ``[m, K]`` input to int8 (else
    they compute exactly like ``backend="cpu"``): decode-sized inputs, group sizes that are multiples of 64, an
    AVX2 CPU and a level set whose levels are small integers after one power-of-two shift
    (``LevelSet.int8_shift``)."""
    return m <= GEMM_MIN_M and group_size % INT8_BLOCK == 0 and level_set.int8_shift is not None and _cpu_runs_int8()


def bf16_path(m: int) -> bool:
    """Whether ``backend="cpu_int8"`` (and ``"auto"``) multiply an ``[m, K]`` input in bfloat16: prefill-sized
    inputs (``m > GEMM_MIN_M``) on a CPU with AVX2 (the int8 backends run there) and AMX or AVX512-BF16 (bfloat16
    GEMM 3-5x fp32)."""
    return m > GEMM_MIN_M and _cpu_runs_int8() and _bf16_gemm()
