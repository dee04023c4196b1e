"""The kernel cache is trusted only when it is ours: each way a cached library can be wrong (planted, corrupt, empty,
foreign permissions, a link, a directory others can write) is rebuilt or refused before any of its code runs.

The kernel-only target (no torch headers) is built once in the user's cache; each test works on its own copy of it,
and a "rebuild" copies the good library back (the real compiler runs in the first build and in test_cpu_kernel).
"""

import os
import shutil
import subprocess
import warnings

import pytest
import torch

from optimum_pot.format.registry import from_id
from optimum_pot.kernels.cpu import build, cache, linear
from optimum_pot.kernels.cpu.build import KernelBuildError


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    """A private cache directory holding a built, recorded kernel library (a copy of the user's cached one, built
    there on first use: CI builds it once)."""
    try:
        build.load_kernel()
        path, _ = build.cached_path("kernel")
    except KernelBuildError as err:
        pytest.skip(f"no compiler: {err}")
    root = tmp_path_factory.mktemp("good_cache")
    (root / "cpu_kernel").mkdir(mode=0o700)
    for f in (path, cache.record_path(path)):
        shutil.copy2(f, root / "cpu_kernel" / f.name)
    return root, root / "cpu_kernel" / path.name


@pytest.fixture()
def env(good_cache, tmp_path, monkeypatch):
    """A private copy of the good cache as $OPTIMUM_POT_CACHE, the expected library path, and a list of rebuilds."""
    root, good = good_cache
    shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("OPTIMUM_POT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_LOADED", {})
    rebuilds = []

    def fake_compile(cxx, units, link, out):  # like the real one: a new file renamed over the old path
        tmp = out.with_suffix(".tmp")
        shutil.copy(good, tmp)
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
        rebuilds.append(out)

    monkeypatch.setattr(build, "_run_compilers", fake_compile)
    path, _ = build.cached_path("kernel")
    assert path.exists() and path != good
    return path, rebuilds


def load_warning(match):
    with pytest.warns(RuntimeWarning, match=match):
        lib = build.load_kernel()
    assert lib.pot_cpu_gemm_min_m() == linear.GEMM_MIN_M  # the rebuilt library works
    return lib


def test_trusted_cache_is_reused_quietly(env):
    path, rebuilds = env
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build.load_kernel()
    assert rebuilds == []


def evil_library(tmp_path) -> str:
    """A library whose constructor creates $POT_EVIL_MARKER when it is loaded (runs code at dlopen)."""
    src = tmp_path / "evil.cpp"
    src.write_text('#include <cstdio>\n#include <cstdlib>\n__attribute__((constructor)) static void evil() '
                   '{ if (FILE* f = std::fopen(std::getenv("POT_EVIL_MARKER"), "w")) std::fclose(f); }\n')  # fmt: skip
    out = tmp_path / "evil.so"
    subprocess.run([build.compiler(), "-shared", "-fPIC", str(src), "-o", str(out)], check=True, timeout=120)
    return out


@pytest.mark.parametrize("record", ["none", "copied"])
def test_planted_library_never_runs(env, tmp_path, monkeypatch, record):
    """A library planted at the cache path (without a build record, or with the real library's record) is rebuilt
    before anything loads it: its constructor never runs."""
    path, rebuilds = env
    marker = tmp_path / "evil_ran"
    monkeypatch.setenv("POT_EVIL_MARKER", str(marker))
    shutil.copy(evil_library(tmp_path), path)
    if record == "none":
        cache.record_path(path).unlink()
    load_warning("build record .* missing" if record == "none" else "SHA-256 differs")
    assert rebuilds == [path] and not marker.exists()


def test_corrupt_library_is_rebuilt(env):
    path, rebuilds = env
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    load_warning("SHA-256 differs")
    assert rebuilds == [path]


def test_empty_library_is_rebuilt(env):
    path, rebuilds = env
    path.write_bytes(b"")
    load_warning("library is empty")
    assert rebuilds == [path]


def test_library_writable_by_others_is_rebuilt(env):
    path, rebuilds = env
    os.chmod(path, 0o777)
    load_warning("writable by group or others")
    assert rebuilds == [path] and not os.stat(path).st_mode & 0o022


def test_linked_library_is_rebuilt(env, good_cache):
    path, rebuilds = env
    path.unlink()
    path.symlink_to(good_cache[1])
    load_warning("not a regular file")
    assert rebuilds == [path] and not path.is_symlink()


def test_cache_directory_writable_by_others_is_refused(env):
    path, rebuilds = env
    os.chmod(path.parent, 0o777)
    with pytest.raises(KernelBuildError, match="refusing the kernel cache .* writable by group or others.*chmod go-w"):
        build.load_kernel()
    assert rebuilds == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
def test_cache_directory_of_another_user_is_refused(env):
    path, rebuilds = env
    os.chown(path.parent, 65534, 65534)
    with pytest.raises(KernelBuildError, match="owned by uid 65534, not by you"):
        build.load_kernel()
    assert rebuilds == []


def test_failed_load_falls_back_naming_the_cause(env, monkeypatch):
    """A recorded library that the loader rejects (here: not an ELF file) raises the loader's own message, and the
    layer falls back to the reference with a warning naming it (not a missing compiler)."""
    path, _ = env
    path.write_bytes(b"not a shared library\n")
    _, key = build.cached_path("kernel")
    cache.write_record(path, {"key": key})
    with pytest.raises(KernelBuildError, match="could not load .*pot_kernel_") as info:
        build.load_kernel()
    assert "header" in str(info.value) or "ELF" in str(info.value) or "short" in str(info.value)
    monkeypatch.setitem(linear._STATE, "lib", None)
    monkeypatch.setitem(linear._STATE, "error", None)
    monkeypatch.setattr(linear, "load_op", build.load_kernel)  # the operator's loader meets the same file
    ls = from_id("pot:4")
    x, packed, scale = torch.randn(2, 64), torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 1).half()
    with pytest.warns(RuntimeWarning, match="could not load") as record:
        linear.pot_linear_cpu(x, packed, scale, None, None, ls, 64, 64)
    assert "compiler" not in str(record[0].message)
