"""The C++ CPU kernels (``backend="cpu"``, ``"cpu_int8"``, ``"auto"``) against the one reference implementation.

tests/test_conformance.py runs every registered level set through the layer; here the kernels' own paths: odd and
partial shapes, every code of a table, offsets, the prefill tiles, tables the fast paths cannot take, the int8 path,
the portable build, the operator's registration (eager dispatch, compile, export) and the fallbacks.
"""

import pytest
import torch

from optimum_pot import PoTConfig, quantize, set_backend
from optimum_pot.format.activations import fake_quantize_activations_int8
from optimum_pot.format.groups import num_groups
from optimum_pot.format.level_set import LevelSet
from optimum_pot.format.packing import pack
from optimum_pot.format.registry import from_id
from optimum_pot.kernels.cpu import build, ctypes_kernel, linear
from optimum_pot.kernels.cpu.build import KernelBuildError
from optimum_pot.library import ops
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear

from .conftest import make_tiny_llama

# (N, K, group_size): odd N and K, partial last groups, a group size the AVX2 path cannot take (100), K < 64.
SHAPES = [(13, 72, 64), (200, 577, 128), (13, 577, 100), (9, 40, 32)]
SHAPE_IDS = [f"N{n}-K{k}-g{g}" for n, k, g in SHAPES]
# One level set per kernel path: 2/3-bit tables (with and without offset), the 4-bit bf16 byte table (single- and
# two-term, with offset), and a 4-bit table that is not exact in bf16 (the permute-pair path).
LEVELS = ["pot:2", "int:3:offset", "sp2:3", "pot:4:nozero", "sp2:4:offset"]
NOT_BF16 = LevelSet("test", 4, tuple(v + (2**-11 if v > 0 else -(2**-11)) * (i % 8 == 1)
                                     for i, v in enumerate(from_id("pot:4").values)))  # ±(0.5 + 2^-11)  # fmt: skip


def make_weight(n, k, ls, group_size, seed=0):
    """Random packed codes (every code), fp16 scales with one all-zero group, and offsets if ``ls`` has them."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << ls.bits, (n, k), dtype=torch.uint8, generator=gen)
    g = num_groups(k, group_size)
    scale = (torch.rand(n, g, generator=gen) * 0.2 + 1e-3).to(torch.float16)
    scale[0, 0] = 0.0
    offset = ((torch.rand(n, g, generator=gen) - 0.5) * 0.1).to(torch.float16) if ls.offset else None
    return pack(codes, ls.bits), scale, offset


def check_kernel(fn, ls, n, k, g, m, has_bias=True, dtype=torch.float32, x_transform=None, seed=0):
    packed, scale, offset = make_weight(n, k, ls, g, seed)
    x = (torch.randn(m, k) * torch.logspace(-2, 1, k)).to(dtype)  # columns of very different magnitude
    bias = torch.randn(n).to(dtype) if has_bias else None
    y = fn(x, packed, scale, offset, bias, ls, g, k)
    assert y.dtype == dtype and y.shape == (m, n)
    xr = x.float() if x_transform is None else x_transform(x.float())
    # The kernel computes in fp32: compare with the fp32 reference on the same (rounded) inputs.
    ref = pot_linear_reference(xr, packed, scale, offset, None if bias is None else bias.float(), ls, g, k)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=tol, atol=tol * ref.abs().max().item())
    return y, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 12, 64], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("levels", LEVELS)
def test_matches_reference(lib, levels, shape, m, dtype):
    check_kernel(linear.pot_linear_cpu, from_id(levels), *shape, m, has_bias=m != 3, dtype=dtype)


@pytest.mark.parametrize("m", [1, 5, 40], ids=lambda m: f"M{m}")
def test_table_not_exact_in_bf16(lib, m):
    """A 4-bit table the byte-table path cannot hold takes the permute-pair path, still exact to fp32."""
    assert any(int(torch.tensor(v).view(torch.int32)) & 0xFFFF for v in NOT_BF16.values)
    check_kernel(linear.pot_linear_cpu, NOT_BF16, 29, 577, 128, m)


def test_gemm_path_in_several_tiles(lib):
    """Prefill-sized inputs decode the weight tile by tile (K=577 -> 640 columns, 11 rows: 3 tiles, one partial)."""
    previous = lib.pot_op_set_tile_floats(11 * 640)
    try:
        for levels in ("pot:3", "sp2:4:offset", "int:2:offset"):
            check_kernel(linear.pot_linear_cpu, from_id(levels), 29, 577, 128, 40)
    finally:
        lib.pot_op_set_tile_floats(previous)


@pytest.mark.parametrize("fast", [False, True], ids=["fp32-cpu", "amx-cpu"])
def test_prefill_gemm_in_bfloat16_where_fast(lib, monkeypatch, fast):
    """cpu_int8 and auto multiply prefill-sized inputs in bfloat16 only where this CPU's bfloat16 GEMM is fast
    (forced both ways here), in one tile or several; ``cpu`` always computes in fp32."""
    monkeypatch.setitem(linear._STATE, "bf16", fast)
    ls, (n, k, g) = from_id("sp2:4:offset"), (29, 577, 128)
    packed, scale, offset = make_weight(n, k, ls, g)
    x, bias = torch.randn(40, k), torch.randn(n)
    exact = pot_linear_reference(x, packed, scale, offset, bias, ls, g, k)
    rounded = pot_linear_reference(x.bfloat16(), packed, scale, offset, bias, ls, g, k).float()
    reduced = fast and linear._cpu_runs_int8()
    assert linear.bf16_path(40) == reduced and not linear.bf16_path(linear.GEMM_MIN_M)
    previous = lib.pot_op_set_tile_floats(11 * 640)
    try:
        for _tiles in ("several", "one"):
            for fn in (linear.pot_linear_cpu_int8, linear.pot_linear_cpu_auto):
                y = fn(x, packed, scale, offset, bias, ls, g, k)
                top = exact.abs().max().item()
                if reduced:
                    torch.testing.assert_close(y, rounded, rtol=1.6e-2, atol=1.6e-2 * top)
                    assert not torch.allclose(y, exact, rtol=1e-5, atol=1e-5 * top)  # it did round
                else:
                    torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5 * top)
            y = linear.pot_linear_cpu(x, packed, scale, offset, bias, ls, g, k)
            torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
            # bfloat16 inputs: every backend, `cpu` too, takes the bfloat16 GEMM where it is fast (the reference
            # decodes the weight in the input's dtype); elsewhere the fp32 GEMM on the widened input.
            y = linear.pot_linear_cpu(x.bfloat16(), packed, scale, offset, bias, ls, g, k)
            widened = pot_linear_reference(x.bfloat16().float(), packed, scale, offset, bias, ls, g, k)
            assert y.dtype == torch.bfloat16
            if fast:
                torch.testing.assert_close(y.float(), rounded, rtol=3e-2, atol=3e-2 * top)
                assert not torch.equal(y, widened.bfloat16())  # it did not take the fp32 GEMM
            else:
                # fp32 accumulation, one rounding to bfloat16 at the end (the order may differ: 1 ulp)
                torch.testing.assert_close(y.float(), widened, rtol=8e-3, atol=8e-3 * top)
            lib.pot_op_set_tile_floats(previous)
    finally:
        lib.pot_op_set_tile_floats(previous)


def test_auto_model_prefills_in_bfloat16_where_fast(lib, monkeypatch):
    """A whole model with the default backend on an AMX CPU (forced here): prompt logits within bfloat16 rounding
    of the fp32 backend's, and not identical to them (the path ran); decoding after the prompt still works."""
    if not linear._cpu_runs_int8():
        pytest.skip("the reduced-precision paths need an AVX2 CPU")
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64))
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        exact = set_backend(model, "cpu")(ids).logits
        monkeypatch.setitem(linear._STATE, "bf16", True)
        fast = set_backend(model, "auto")(ids).logits
        out = model.generate(ids[:1, :20], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(fast, exact, rtol=3e-2, atol=3e-2 * exact.abs().max().item())
    assert not torch.equal(fast, exact) and out.shape == (1, 24)


def test_gemm_min_m_agrees_with_the_library(lib):
    assert lib.pot_cpu_gemm_min_m() == linear.GEMM_MIN_M


def test_eager_layer_makes_one_dispatch(lib):
    """Eager PoTLinear inference on CPU is exactly one operator call: optimum_pot_cpu::linear."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q = PoTLinear.from_float(torch.nn.Linear(128, 16), "sp2:4:offset", 64, backend="cpu")
    x = torch.randn(2, 128)
    with torch.no_grad(), Log() as log:
        q(x)
    assert log.ops == ["optimum_pot_cpu.linear.default"]


def test_opcheck(lib):
    ls = from_id("sp2:4:offset")
    packed, scale, offset = make_weight(13, 72, ls, 64)
    for x in (torch.randn(3, 72), torch.randn(2, 20, 72)):  # decode and prefill rows
        for int8 in (False, True):
            args = (x, packed, scale, offset, torch.randn(13), ls.values, ls.int8_shift, 64, 72, int8)
            torch.library.opcheck(torch.ops.optimum_pot_cpu.linear.default, args)


@pytest.mark.parametrize("backend", ["cpu", "cpu_int8", "auto"])
def test_compiled_and_exported_graphs_hold_the_cpp_op(lib, backend):
    """torch.compile and torch.export trace PoTLinear to optimum_pot_cpu::linear (no Python-implemented op) and
    compute what eager computes, at decode and prefill sizes."""
    q = PoTLinear.from_float(torch.nn.Linear(128, 24), "sp2:4:offset", 64, backend=backend).eval()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(q, backend=capture)
    for x in (torch.randn(1, 3, 128), torch.randn(2, 20, 128)):
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert targets == {"optimum_pot_cpu.linear"}
    x = torch.randn(3, 128)
    with torch.no_grad():
        exported = torch.export.export(q, (x,))
        targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
        assert targets == ["optimum_pot_cpu.linear.default"]
        torch.testing.assert_close(exported.module()(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "cpu_int8"])
def test_torch_compile_tiny_model(lib, backend):
    """A compiled model (decode-sized and prefill inputs) equals eager."""
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64, backend=backend))
    compiled_model = torch.compile(model, backend="aot_eager")
    for shape in ((1, 5), (2, 12)):  # 5 rows: the decode path (integer path for cpu_int8); 24 rows: the GEMM path
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_aoti_package_runs_without_python_ops(lib, tmp_path):
    """An AOTInductor package of a PoT layer runs in a fresh process that loaded only the operator library."""
    import subprocess
    import sys

    q = PoTLinear.from_float(torch.nn.Linear(128, 24), "sp2:4:offset", 64, backend="cpu").eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        package = torch._inductor.aoti_compile_and_package(torch.export.export(q, (x,)),
                                                           package_path=str(tmp_path / "pot.pt2"))  # fmt: skip
        torch.save({"x": x, "y": q(x)}, tmp_path / "io.pt")
    so = lib._name  # the operator library's path
    script = (
        "import sys, torch; torch.ops.load_library(sys.argv[1]); io = torch.load(sys.argv[3]);"
        "y = torch._inductor.aoti_load_package(sys.argv[2])(io['x']);"
        "assert 'optimum_pot' not in sys.modules; torch.testing.assert_close(y, io['y'], rtol=0, atol=0)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(so), package, str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- backend="cpu_int8" / "auto": int8 activations, integer accumulation (decode rows); the fp32 path otherwise ---


@pytest.mark.parametrize("m", [1, 3, 12], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("levels", LEVELS)
def test_int8_matches_its_reference(lib, levels, shape, m):
    """Equal (fp32 accumulation tolerance) to the reference on int8-rounded activations where the integer path runs
    (group size a multiple of 64), and to the plain reference where it computes in fp32 (g100, g32)."""
    ls = from_id(levels)
    n, k, g = shape
    integer = linear.int8_path(m, g, ls)
    assert integer == (g % 64 == 0)  # every built-in level set has an int8 shift
    y, _ = check_kernel(linear.pot_linear_cpu_int8, ls, *shape, m, seed=ls.bits,
                        x_transform=fake_quantize_activations_int8 if integer else None)  # fmt: skip
    packed, scale, offset = make_weight(n, k, ls, g, ls.bits)
    x = torch.randn(m, k) * torch.logspace(-2, 1, k)
    exact = pot_linear_reference(x, packed, scale, offset, None, ls, g, k)
    approx = linear.pot_linear_cpu_int8(x, packed, scale, offset, None, ls, g, k)
    assert ((approx - exact).norm() / exact.norm()).item() < (3e-2 if integer else 1e-5)


def test_int8_without_a_shift_computes_in_fp32(lib):
    ls = NOT_BF16
    assert ls.int8_shift is None and not linear.int8_path(1, 128, ls)
    check_kernel(linear.pot_linear_cpu_int8, ls, 29, 577, 128, 1)


def test_int8_nonfinite_activations_give_nan(lib):
    ls = from_id("sp2:4:offset")
    packed, scale, offset = make_weight(8, 128, ls, 64)
    x = torch.randn(2, 128)
    x[0, 70] = float("inf")
    x[1, 3] = float("nan")
    y = linear.pot_linear_cpu_int8(x, packed, scale, offset, None, ls, 64, 128)
    assert torch.isnan(y).all()
    assert torch.isnan(fake_quantize_activations_int8(x)[0, 64:]).all()


def test_auto_takes_int8_for_decode_and_exact_fp32_for_prefill_without_amx(lib, monkeypatch):
    """(With AMX, prefill is in bfloat16: test_prefill_gemm_in_bfloat16_where_fast.)"""
    monkeypatch.setitem(linear._STATE, "bf16", False)
    assert ops.resolve("cpu", "auto") is linear.pot_linear_cpu_auto
    ls = from_id("sp2:4:offset")
    check_kernel(linear.pot_linear_cpu_auto, ls, 13, 256, 64, 1, x_transform=fake_quantize_activations_int8)
    check_kernel(linear.pot_linear_cpu_auto, ls, 13, 256, 64, 40)


def test_int8_on_a_cpu_without_avx2_warns_once_and_computes_fp32(lib, monkeypatch):
    monkeypatch.setattr(linear, "_cpu_runs_int8", lambda: False)
    monkeypatch.setitem(linear._STATE, "int8_warned", False)
    ls = from_id("pot:4")
    with pytest.warns(RuntimeWarning, match="needs a CPU with AVX2") as record:
        check_kernel(linear.pot_linear_cpu_int8, ls, 13, 128, 64, 1)
        check_kernel(linear.pot_linear_cpu_int8, ls, 13, 128, 64, 1)
    assert len([w for w in record if "AVX2" in str(w.message)]) == 1
    check_kernel(linear.pot_linear_cpu_auto, ls, 13, 128, 64, 1)  # auto: fp32 quietly (no new warning)


def test_int8_backend_through_config(lib):
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64, backend="cpu_int8"))
    ids = torch.randint(0, 256, (1, 6))
    assert ops.resolve("cpu", "cpu_int8") is linear.pot_linear_cpu_int8
    with torch.no_grad():
        logits = model(ids).logits
        exact = set_backend(model, "cpu")(ids).logits
    assert model.config.quantization_config.backend == "cpu"
    assert torch.isfinite(logits).all()
    assert ((logits - exact).norm() / exact.norm()).item() < 0.05


# --- the portable build, fallbacks, registration ---


@pytest.mark.parametrize("levels", ["pot:2", "int:3:offset", "sp2:4:offset", "pot:4"])
def test_portable_build_matches(levels):
    """The scalar path (what a CPU without AVX2 gets) is compiled (kernel-only build) and checked too; its int8
    entry point computes in fp32."""
    try:
        plain = ctypes_kernel.bind(build.load_kernel(avx2=False))
    except KernelBuildError as err:
        pytest.skip(f"no compiler: {err}")
    assert plain.pot_cpu_has_avx2() == 0
    ls = from_id(levels)

    def kernel(int8):
        return lambda x, p, s, z, b, ls_, g, k: ctypes_kernel.linear(plain, x, p, s, z, b, ls_, g, k, int8, 2)

    for m in (3, 40):
        check_kernel(kernel(False), ls, 13, 577, 128, m)
    check_kernel(kernel(True), ls, 13, 577, 128, 3)


def test_failed_build_warns_naming_the_cause_and_falls_back(monkeypatch):
    def fail():
        raise KernelBuildError("could not load /cache/pot_op_x.so: invalid ELF header")

    monkeypatch.setitem(linear._STATE, "lib", None)
    monkeypatch.setitem(linear._STATE, "error", None)
    monkeypatch.setattr(linear, "load_op", fail)
    ls = from_id("sp2:3")
    packed, scale, offset = make_weight(13, 72, ls, 64)
    x = torch.randn(2, 72)
    with pytest.warns(RuntimeWarning, match="invalid ELF header") as record:
        y = linear.pot_linear_cpu(x, packed, scale, offset, None, ls, 64, 72)
    assert "compiler" not in str(record[0].message)
    torch.testing.assert_close(y, pot_linear_reference(x, packed, scale, offset, None, ls, 64, 72))
    assert not linear.is_available()
    assert ops.resolve("cpu", "auto") is pot_linear_reference  # auto falls back quietly afterwards
    with pytest.raises(RuntimeError, match="not available"):
        ops.resolve("cpu", "cpu")


def test_builder_errors_name_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_POT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"):
        build.load_kernel()
    monkeypatch.setattr(build, "compiler", lambda: "false")  # a "compiler" that always fails
    with pytest.raises(KernelBuildError, match="false failed to compile"):
        build.load_kernel()


def test_import_does_not_compile(monkeypatch):
    """Re-running the registration module with a builder that fails proves importing never builds."""
    import importlib

    import optimum_pot.kernels.cpu as cpu_pkg

    def fail():
        raise AssertionError("the kernel was compiled at import")

    monkeypatch.setattr(cpu_pkg, "load_op", build.load_op)  # restored after the reload rebinds it
    monkeypatch.setattr(build, "load_op", fail)
    importlib.reload(cpu_pkg)
    assert ops._KERNELS[("cpu", "cpu")][0] is linear.pot_linear_cpu


def test_kernel_thread_count(lib, monkeypatch):
    """``set_num_threads`` overrides; ``None`` returns to ``$OPTIMUM_POT_NUM_THREADS`` (read once), else torch's."""
    monkeypatch.setattr(linear, "_THREADS", [])
    monkeypatch.setattr(linear, "_ENV_THREADS", [])
    monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "3")
    try:
        assert linear.num_threads() == 3
        linear.set_num_threads(1)
        assert linear.num_threads() == 1
        assert lib.pot_op_set_threads(1) == 1  # the operator got it
        linear.set_num_threads(None)
        monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "5")  # read once: a later change does not count
        assert linear.num_threads() == 3
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="positive integer or None"):
                linear.set_num_threads(bad)
    finally:
        lib.pot_op_set_threads(0)


def test_bad_thread_env_warns_and_follows_torch(monkeypatch):
    monkeypatch.setattr(linear, "_THREADS", [])
    monkeypatch.setattr(linear, "_ENV_THREADS", [])
    monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "two")
    with pytest.warns(RuntimeWarning, match="set it to a positive integer"):
        assert linear.num_threads() == torch.get_num_threads()
