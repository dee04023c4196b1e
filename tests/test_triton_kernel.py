"""The Triton backend on a machine without a GPU.

* ``tests/triton_cases.py`` (kernels == reference for every registered level set, M ∈ {1, 5, 33, 128},
  float16/bfloat16, odd K and N, offsets, tiny and huge scales) runs in a subprocess under Triton's CPU interpreter:
  ``TRITON_INTERPRET=1`` has to be set before the kernels are decorated, which this process cannot guarantee.
* ``tests/triton_compile_check.py`` runs in a subprocess *without* the interpreter, where the kernels are real
  ``JITFunction``s: lazy import, ``torch.compile`` tracing into the kernels (the ``triton_op``) and ahead-of-time
  compilation to sm_80/sm_90 cubins; none of it needs a GPU, only running does.
* The level sets' kernel descriptors (pure Python), error messages and the benchmark's no-GPU exit run here. The
  two subprocesses start together (one fixture) so that they overlap on the CI's two cores.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from optimum_pot.format.level_set import LevelSet
from optimum_pot.format.packing import pack
from optimum_pot.format.registry import get_level_set
from optimum_pot.kernels.triton import tables
from optimum_pot.library.ops import pot_linear
from optimum_pot.library.reference import pot_linear_reference

from .level_sets import ALL_LEVEL_SETS, ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def python_env(interpret: bool, cache=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if cache is not None:  # a fresh Triton cache: really compile
        env["TRITON_CACHE_DIR"] = str(cache)
    return env


def start_python(args, interpret: bool, cache=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=python_env(interpret, cache), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def triton_runs(tmp_path_factory):
    """Both slow subprocesses, started together so that they overlap on the two cores."""
    runs = {
        "cases": start_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_cases.py"], True),
        "compile": start_python(["tests/triton_compile_check.py"], False, tmp_path_factory.mktemp("triton_cache")),
    }
    yield runs
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@needs_triton
def test_interpreted_kernels_match_reference(triton_runs):
    rc, out, err = finish(triton_runs["cases"])
    assert rc == 0, out[-6000:] + err[-3000:]
    assert " passed" in out and "skipped" not in out.splitlines()[-1]


@needs_triton
def test_lazy_import_tracing_and_ahead_of_time_gpu_compile(triton_runs):
    """See tests/triton_compile_check.py: no GPU is needed to trace and to compile for one."""
    rc, out, err = finish(triton_runs["compile"])
    assert rc == 0, out[-3000:] + err[-3000:]
    lines = out.splitlines()
    assert "lazy import ok" in lines and "torch.compile traces ok" in lines
    assert "pot_linear decomposes into the kernels on CUDA ok" in lines
    assert sum(line.startswith("compiled ") for line in lines) == 11, out
    assert any(line.startswith("compiled gemm fp16 sp2:4:offset") for line in lines)  # two terms with offsets


def tiny_args(level_set=None):
    level_set = level_set or get_level_set("pot", 4)
    packed = pack(torch.zeros(4, 16, dtype=torch.uint8), level_set.bits)
    return torch.ones(2, 16), packed, torch.ones(4, 1, dtype=torch.float16), None, None, level_set, 16, 16


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_descriptors_hold_every_level_exactly(ls):
    """Each code's descriptor stands for its level (the kernels' TERMS per level), and float16 scales need no
    exponent guard with any registered level set."""
    terms = ls.max_terms
    assert terms in (1, 2) and tables.unsupported_reason(ls) is None and tables.half_safe(ls)
    descriptors = tables.descriptors(ls)
    assert len(descriptors) == 1 << ls.bits and all(-(2**31) <= d < 2**31 for d in descriptors)
    assert [tables.decode_descriptor(d, terms) for d in descriptors] == list(ls.values)
    if terms == 2:  # no zero flag: every code is two exponent-field adds
        assert all(0 <= d < 1 << 18 for d in descriptors)


@needs_triton
@pytest.mark.parametrize("values,reason", [((0.0, 2.0**-130, 1.0, -1.0), "normal range"),
                                           ((0.0, 1.0, 2.0**24 + 1, -1.0), "not exact in float32")])  # fmt: skip
def test_level_sets_beyond_the_descriptors_use_the_reference(values, reason):
    """A (hypothetical) family whose terms leave float32's exponent range or are too far apart to be exact."""
    from optimum_pot.kernels import triton as backend

    ls = LevelSet("wide", 2, values)
    assert reason in (tables.unsupported_reason(ls) or "")
    packed = pack(torch.arange(4, dtype=torch.uint8).repeat(4, 4), 2)  # [4, 16]: every code in every row
    args = (torch.randn(2, 16), packed, torch.ones(4, 1, dtype=torch.float16), None, None, ls, 16, 16)
    torch.testing.assert_close(backend.pot_linear_triton(*args), pot_linear_reference(*args), rtol=0, atol=0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter makes triton usable on CPU")
def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    x, packed, scale, offset, bias, ls, group, k = tiny_args()
    with pytest.raises(RuntimeError, match="'triton' is not available for cpu"):
        pot_linear(x, packed, scale, offset, bias, ls.id, group, k, "triton")


def test_unavailable_reasons_name_the_fix(monkeypatch):
    from optimum_pot.kernels import triton as backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend.triton_installed():
        assert "TRITON_INTERPRET=1" in backend.unavailable_reason("cpu")
    monkeypatch.setattr(backend, "triton_installed", lambda: False)
    assert "pip install triton" in backend.unavailable_reason("cuda")
    assert not backend.cuda_available() and not backend.cpu_available()


def test_missing_triton_raises_install_hint(monkeypatch):
    from optimum_pot.kernels import triton as backend

    monkeypatch.setitem(sys.modules, "optimum_pot.kernels.triton.launch", None)  # makes the import fail
    monkeypatch.delattr(backend, "launch", raising=False)
    with pytest.raises(RuntimeError, match=r"pip install triton"):
        backend.pot_linear_triton(*tiny_args())


def test_gpu_benchmark_without_cuda_exits_cleanly():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would really run")
    rc, out, err = finish(start_python(["bench/gpu_kernels.py", "--smoke"], interpret=False))
    assert rc == 0, err[-3000:]
    assert "no CUDA device" in out
