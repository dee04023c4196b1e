"""Lazy build of the CPU kernel: compiled on first use, cached per source/flags, loaded with ``ctypes``.

The kernel is plain C++ with a C ABI (no torch headers), so the first build takes a few seconds instead of the
minute a ``torch.utils.cpp_extension`` build of ``torch/extension.h`` takes on two cores. Threads come from the
kernel's own pool (``pot_pool.h``), sized per call by ``torch.get_num_threads()``.
AVX2/FMA/F16C code is compiled only when this CPU has them; otherwise the portable path is built.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCES = (Path(__file__).with_name("pot_cpu.cpp"), Path(__file__).with_name("pot_i8.cpp"))
HEADERS = (Path(__file__).with_name("pot_pool.h"), Path(__file__).with_name("pot_simd.h"))
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "pot_cpu_has_avx2": ([], _INT),
    "pot_cpu_fast_layout": ([_I64], _INT),
    # x, M, K, packed, row_bytes, scale, G, group_size, N, bits, zero_level, bias, y, threads
    "pot_cpu_linear": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT, _INT, _PTR, _PTR, _INT], None),
    "pot_cpu_linear_i8": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT, _INT, _PTR, _PTR, _INT], None),
    "pot_cpu_i8_supported": ([_INT, _I64], _INT),
    # packed, row_bytes, scale, G, group_size, K, n0, n1, bits, zero_level, out, threads
    "pot_cpu_decode": ([_PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _INT, _INT, _PTR, _INT], None),
}


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    """``$OPTIMUM_POT_CACHE/cpu_kernel`` (default ``~/.cache/optimum_pot/cpu_kernel``)."""
    root = os.environ.get("OPTIMUM_POT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "optimum_pot")
    return Path(root) / "cpu_kernel"


def compiler() -> str | None:
    """The C++ compiler: ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on ``PATH``."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def cpu_has_avx2() -> bool:
    """Whether this CPU runs AVX2 + FMA + F16C code (read from ``/proc/cpuinfo``, else torch's capability)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        return {"avx2", "fma", "f16c"} <= set(flags.split(":", 1)[1].split())
    except (OSError, StopIteration):
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def compile_flags(avx2: bool) -> list[str]:
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
    return flags + (["-mavx2", "-mfma", "-mf16c"] if avx2 else [])


def _build(cxx: str, out: Path, flags: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent first uses (test workers) never see a partial library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{cxx} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_library() -> ctypes.CDLL:
    """The compiled kernel library, built on the first call (cached on disk and in the process).

    Raises:
        KernelBuildError: no C++ compiler, or the build failed.
    """
    global _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        cxx = compiler()
        if cxx is None:
            raise KernelBuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
        flags = compile_flags(cpu_has_avx2())
        sources = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
        key = hashlib.sha256(sources + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
        path = cache_dir() / f"pot_cpu_{key}.so"
        if not path.exists():
            try:
                _build(cxx, path, flags)
            except OSError as err:
                raise KernelBuildError(f"could not run {cxx}: {err}") from err
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as err:
            raise KernelBuildError(f"could not load {path}: {err}") from err
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _LIB = lib
        return lib
