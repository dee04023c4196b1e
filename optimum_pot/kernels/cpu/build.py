"""Lazy build of the CPU kernels: compiled on first use, cached per source/flags/compiler/torch, checked before load.

Two targets share the kernel sources (``pot_cpu.cpp``, ``pot_i8.cpp``, C ABI in ``pot_api.h``):

* ``op``: the kernels plus ``pot_op.cpp``, the torch operator ``optimum_pot_cpu::linear`` (what every backend
  uses). It includes ``torch/library.h`` and ``ATen/core/Tensor.h`` only, not ``torch/extension.h``; its
  translation units compile in parallel (~10 s of CPU for the operator, ~10 s for the kernels on this machine).
  ``pot_i8.cpp`` is compiled twice: the second time with AVX512-VNNI (:func:`vnni_flags`), chosen at run time.
* ``kernel``: the kernels alone with their C ABI, loaded with ``ctypes`` (no torch headers: a few seconds). Used
  for the portable (non-AVX2) build test, the cache tests and as the "ctypes" baseline of ``bench/cpu_kernels.py``.

Libraries live in ``$OPTIMUM_POT_CACHE/cpu_kernel`` (default ``~/.cache/optimum_pot/cpu_kernel``) under a name keyed
by the sources, flags, compiler version and torch version, and are loaded only after the checks of :mod:`.cache`.
AVX2/FMA/F16C code is compiled only when this CPU has them; otherwise the portable path is built.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

from . import cache

HERE = Path(__file__).parent
KERNEL_SOURCES = ("pot_cpu.cpp", "pot_i8.cpp")
OP_SOURCES = ("pot_op.cpp",)
VNNI_SOURCE = "pot_i8.cpp"  # compiled a second time (see _plan)
HEADERS = ("pot_api.h", "pot_pool.h", "pot_simd.h")
_LOCK = threading.Lock()
_LOADED: dict[tuple, object] = {}  # (target, avx2) -> ctypes handle
BUILD_SECONDS: dict[str, float] = {}  # target -> wall seconds of this process's last build (benchmarks report it)


class KernelBuildError(RuntimeError):
    """The CPU kernel could not be built or loaded; the message names the cause and the fix."""


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


@functools.lru_cache(maxsize=8)
def compiler_version(cxx: str) -> str:
    """``cxx --version``'s first line (part of the cache key: an upgraded compiler rebuilds)."""
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"could not run the C++ compiler {cxx}: {err}; install one (e.g. `apt-get install "
                               "g++`) or point $CXX at it") from err  # fmt: skip
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else cxx


def cpu_has_avx2() -> bool:
    """Whether this CPU runs AVX2 + FMA + F16C code (read from ``/proc/cpuinfo``, else torch's capability)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        return {"avx2", "fma", "f16c"} <= set(flags.split(":", 1)[1].split())
    except (OSError, StopIteration):
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def compile_flags(avx2: bool) -> list[str]:
    """Flags of the kernel sources (``-ffp-contract=off``: decode tables round like the reference's mul + add)."""
    flags = ["-O3", "-std=c++17", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=off"]
    return flags + (["-mavx2", "-mfma", "-mf16c"] if avx2 else [])


@functools.lru_cache(maxsize=8)
def openmp_flags(cxx: str) -> tuple[str, ...]:
    """``("-fopenmp",)`` when torch's intra-op threads are OpenMP's and ``cxx`` builds OpenMP code, else ``()``.

    With it the operator runs the kernels' parallel work on torch's own threads (``at::parallel_for``, see
    ``pot_op.cpp``): the process keeps one OpenMP runtime (``libgomp.so.1`` is already loaded by torch, so the
    linked name resolves to torch's copy). Without it ``at::parallel_for`` would run serially in our code, so the
    kernels keep their own pool. Probed with a tiny shared library once per process and compiler, when the
    kernel library is first loaded (~0.1 s; the flags are part of the cache key).
    """
    import torch

    if not torch._C.has_openmp:
        return ()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("#include <omp.h>\nint pot_probe() { return omp_get_max_threads(); }\n")
        ok = _succeeds([cxx, "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(Path(tmp) / "probe.so")])
    return ("-fopenmp",) if ok else ()


def _succeeds(cmd: list[str]) -> bool:
    """Whether a compiler probe runs and exits 0 (any failure to run it counts as no)."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _torch_flags(cxx: str) -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, version tag) of the operator: torch's headers, libraries and C++ ABI."""
    import torch

    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    omp = list(openmp_flags(cxx))
    cflags = ["-O2", "-std=c++20", "-fPIC", "-pthread", *omp, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
              f"-I{root / 'include'}"]  # fmt: skip
    lib = root / "lib"
    link = [f"-L{lib}", "-lc10", "-ltorch_cpu", *omp, f"-Wl,-rpath,{lib}"]
    return cflags, link, f"torch {torch.__version__} abi{abi}"


@functools.lru_cache(maxsize=8)
def vnni_flags(cxx: str) -> tuple[str, ...]:
    """The flags of the integer path's second unit (AVX512-VNNI + VL), or ``()`` when ``cxx`` does not take them
    (a syntax-only probe, ~20 ms once per process and compiler)."""
    flags = ("-mavx512vnni", "-mavx512vl")
    return flags if _succeeds([cxx, *flags, "-fsyntax-only", "-x", "c++", os.devnull]) else ()


def _plan(target: str, cxx: str, avx2: bool) -> tuple[list[tuple[str, list[str]]], list[str], str, dict]:
    """(per-source compile flags, link flags, cache key, build record) of ``target``."""
    units = [(src, compile_flags(avx2)) for src in KERNEL_SOURCES]
    # pot_i8.cpp once more with VNNI (pot_i8.cpp's header; without AVX2 or the flags it compiles to a stub)
    units.append((VNNI_SOURCE, [*compile_flags(avx2), *(vnni_flags(cxx) if avx2 else ()), "-DPOT_I8_VNNI_UNIT"]))
    link, tag = [], ""
    if target == "op":
        cflags, link, tag = _torch_flags(cxx)
        units += [(src, cflags) for src in OP_SOURCES]
    version = compiler_version(cxx)
    h = hashlib.sha256()
    for name in sorted({*(u[0] for u in units), *HEADERS}):
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    for part in (target, cxx, version, tag, platform.machine(), repr(units), repr(link)):
        h.update(part.encode() + b"\0")
    key = h.hexdigest()
    record = {"key": key, "target": target, "compiler": f"{cxx}: {version}", "torch": tag, "avx2": avx2}
    return units, link, key, record


def _run_compilers(cxx: str, units, link: list[str], out: Path) -> None:
    """Compiles the units in parallel into a private temporary directory, links, and renames into ``out``."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".build-"))
    try:
        procs, objs = [], [str(tmp / f"{i}_{src}.o") for i, (src, _) in enumerate(units)]  # a source may repeat
        for (src, flags), obj in zip(units, objs):
            cmd = [cxx, *flags, "-c", str(HERE / src), "-o", obj]
            procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        failures = []
        for src, proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                failures.append(f"{src}:\n{err[-2000:]}")
        if failures:
            raise KernelBuildError(f"{cxx} failed to compile " + "\n".join(failures))
        proc = subprocess.run([cxx, "-shared", "-pthread", *objs, "-o", str(tmp / "lib.so"), *link],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise KernelBuildError(f"{cxx} failed to link the CPU kernel:\n{proc.stderr[-2000:]}")
        os.chmod(tmp / "lib.so", 0o700)
        os.replace(tmp / "lib.so", out)
    except OSError as err:
        raise KernelBuildError(f"could not run {cxx}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiler_or_raise() -> str:
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError(
            "no C++ compiler found (looked for $CXX, c++, g++, clang++); install one (e.g. `apt-get install g++`)"
        )
    return cxx


def cached_path(target: str, avx2: bool | None = None) -> tuple[Path, str]:
    """(where ``target``'s library is cached, its cache key) for this compiler, flags and sources."""
    avx2 = cpu_has_avx2() if avx2 is None else avx2
    key = _plan(target, _compiler_or_raise(), avx2)[2]
    return cache_dir() / f"pot_{target}_{key[:16]}.so", key


def _build_or_reuse(target: str, avx2: bool) -> Path:
    """The path of a checked library for ``target`` (built when no trusted copy is cached)."""
    cxx = _compiler_or_raise()
    units, link, key, record = _plan(target, cxx, avx2)
    try:
        directory = cache.private_dir(cache_dir())
    except cache.CacheTrustError as err:
        raise KernelBuildError(str(err)) from err
    path = directory / f"pot_{target}_{key[:16]}.so"
    with cache.locked(directory):
        if path.exists() or cache.record_path(path).exists():
            reason = cache.untrusted_reason(path, key)
            if reason is None:
                return path
            warnings.warn(f"optimum_pot: not loading the cached kernel {path}: {reason}; rebuilding it.",
                          RuntimeWarning, stacklevel=4)  # fmt: skip
        t0 = time.perf_counter()
        _run_compilers(cxx, units, link, path)
        cache.write_record(path, record)
        BUILD_SECONDS[target] = time.perf_counter() - t0
        reason = cache.untrusted_reason(path, key)
        if reason is not None:
            raise KernelBuildError(f"the freshly built {path} fails its check: {reason}")
        return path


def _load(target: str, avx2: bool | None, loader) -> ctypes.CDLL:
    avx2 = cpu_has_avx2() if avx2 is None else avx2
    with _LOCK:
        if (target, avx2) in _LOADED:
            return _LOADED[(target, avx2)]
        path = _build_or_reuse(target, avx2)
        try:
            lib = loader(path)
        except (OSError, RuntimeError) as err:
            raise KernelBuildError(f"could not load {path}: {err}") from err
        _LOADED[(target, avx2)] = lib
        return lib


def _load_op_library(path: Path) -> ctypes.CDLL:
    import torch

    torch.ops.load_library(str(path))  # registers optimum_pot_cpu::linear
    lib = ctypes.CDLL(str(path))  # the same handle: its C functions (threads, tile size, capability)
    lib.pot_op_set_threads.argtypes, lib.pot_op_set_threads.restype = [ctypes.c_int], ctypes.c_int
    lib.pot_op_set_tile_floats.argtypes, lib.pot_op_set_tile_floats.restype = [ctypes.c_int64], ctypes.c_int64
    return lib


def load_op() -> ctypes.CDLL:
    """Builds (first use) and loads the operator library; ``torch.ops.optimum_pot_cpu.linear`` exists afterwards.

    Returns the library's ``ctypes`` handle (its C functions: ``pot_cpu_has_avx2``, ``pot_op_set_threads``...).

    Raises:
        KernelBuildError: no compiler, the build failed, the cache is not private, or the library did not load.
    """
    return _load("op", None, _load_op_library)


def load_kernel(avx2: bool | None = None) -> ctypes.CDLL:
    """Builds (first use) and loads the kernel-only library (C ABI, no torch), for ``ctypes`` callers.

    Args:
        avx2 (`bool`, *optional*): compile the AVX2 paths (default: when this CPU has AVX2/FMA/F16C); ``False``
            builds the portable code a CPU without AVX2 gets.
    """
    return _load("kernel", avx2, lambda path: ctypes.CDLL(str(path)))
