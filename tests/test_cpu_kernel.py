"""The C++ CPU kernel (``backend="cpu"``) against the one reference implementation."""

import pytest
import torch

from optimum_pot import PoTConfig, quantize, set_backend
from optimum_pot.format.activations import fake_quantize_activations_int8
from optimum_pot.format.levels import num_groups
from optimum_pot.format.packing import pack
from optimum_pot.kernels.cpu import build, linear
from optimum_pot.kernels.cpu.build import KernelBuildError
from optimum_pot.library import ops
from optimum_pot.library.reference import pot_linear_reference

# (N, K, group_size): odd N and K, partial last groups, a group size the AVX2 path cannot take (100), K < 64.
SHAPES = [(13, 72, 64), (200, 577, 128), (13, 577, 100), (9, 40, 32)]
SHAPE_IDS = [f"N{n}-K{k}-g{g}" for n, k, g in SHAPES]


def make_weight(n, k, bits, group_size, seed=0):
    """Random packed codes (every code, the zero code included) and fp16 scales, with one all-zero group."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(n, num_groups(k, group_size), generator=gen) * 0.2 + 1e-3).to(torch.float16)
    scale[0, 0] = 0.0
    return pack(codes, bits), scale


@pytest.fixture(scope="module")
def kernel():
    """Builds (or loads the cached) kernel once; skips if this machine cannot build it."""
    try:
        build.load_library()
    except KernelBuildError as err:
        pytest.skip(f"CPU kernel unavailable: {err}")
    return linear.pot_linear_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 64, 512], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_matches_reference(kernel, bits, shape, m, has_bias, dtype):
    n, k, g = shape
    packed, scale = make_weight(n, k, bits, g)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if has_bias else None
    y = kernel(x, packed, scale, bias, bits, g, k, True)
    assert y.dtype == dtype and y.shape == (m, n)
    # The kernel computes in fp32: compare with the fp32 reference on the same (rounded) inputs.
    ref = pot_linear_reference(x.float(), packed, scale, None if bias is None else bias.float(), bits, g, k, True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_without_zero_level(kernel, bits):
    packed, scale = make_weight(31, 256, bits, 64, seed=1)
    x = torch.randn(5, 256)
    y = kernel(x, packed, scale, None, bits, 64, 256, False)
    torch.testing.assert_close(y, pot_linear_reference(x, packed, scale, None, bits, 64, 256, False))


def test_batched_input_and_op_dispatch(kernel):
    """``[B, T, K]`` inputs (decode and prefill shapes) through the op; ``auto`` picks the kernel on CPU."""
    packed, scale = make_weight(40, 130, 4, 64)
    bias = torch.randn(40)
    assert ops.resolve("cpu", "auto") is linear.pot_linear_cpu
    for x in (torch.randn(1, 1, 130), torch.randn(2, 50, 130)):
        y = torch.ops.optimum_pot.pot_linear(x, packed, scale, bias, 4, 64, 130, True, "cpu")
        ref = pot_linear_reference(x, packed, scale, bias, 4, 64, 130, True)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_gemm_path_in_several_tiles(kernel, bits, monkeypatch):
    """Prefill-sized inputs decode the weight tile by tile (here 3 tiles, the last one partial)."""
    monkeypatch.setattr(linear, "TILE_FLOATS", 11 * 640)  # K=577 -> 640 padded columns, 11 rows per tile
    packed, scale = make_weight(29, 577, bits, 128)
    x = torch.randn(40, 577)
    bias = torch.randn(29)
    y = kernel(x, packed, scale, bias, bits, 128, 577, True)
    ref = pot_linear_reference(x, packed, scale, bias, bits, 128, 577, True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_opcheck(kernel):
    packed, scale = make_weight(13, 72, 4, 64)
    x = torch.randn(3, 72, requires_grad=True)
    bias = torch.randn(13, requires_grad=True)
    torch.library.opcheck(torch.ops.optimum_pot.pot_linear.default, (x, packed, scale, bias, 4, 64, 72, True, "cpu"))


@pytest.mark.parametrize("backend", ["cpu", "cpu_int8"])
def test_torch_compile_tiny_model(kernel, backend):
    """Compiled inference goes through ``pot_linear_infer`` and equals eager (decode-sized and prefill inputs)."""
    from conftest import make_tiny_llama

    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64, backend=backend))
    compiled_model = torch.compile(model, backend="aot_eager")
    for shape in ((1, 5), (2, 12)):  # 5 rows: the decode path (integer path for cpu_int8); 24 rows: the GEMM path
        ids = torch.randint(0, 256, shape)
        with torch.no_grad():
            torch.testing.assert_close(compiled_model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_portable_build_matches(tmp_path, monkeypatch):
    """The scalar path (what a CPU without AVX2 gets) is compiled and checked too."""
    monkeypatch.setenv("OPTIMUM_POT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LIB", None)
    monkeypatch.setattr(build, "cpu_has_avx2", lambda: False)
    try:
        lib = build.load_library()
    except KernelBuildError as err:
        pytest.skip(f"no compiler: {err}")
    assert lib.pot_cpu_has_avx2() == 0
    monkeypatch.setattr(linear, "_LIB", [lib])
    for bits in (2, 3, 4):
        packed, scale = make_weight(13, 577, bits, 128)
        x = torch.randn(3, 577)
        ref = pot_linear_reference(x, packed, scale, None, bits, 128, 577, True)
        torch.testing.assert_close(linear.pot_linear_cpu(x, packed, scale, None, bits, 128, 577, True), ref)
        x = torch.randn(40, 577)  # the decode-then-GEMM path
        ref = pot_linear_reference(x, packed, scale, None, bits, 128, 577, True)
        torch.testing.assert_close(linear.pot_linear_cpu(x, packed, scale, None, bits, 128, 577, True), ref)


def test_no_compiler_warns_once_and_falls_back(monkeypatch):
    def fail():
        raise KernelBuildError("no C++ compiler found")

    monkeypatch.setattr(linear, "_LIB", [])
    monkeypatch.setattr(linear, "_FAILED", [])
    monkeypatch.setattr(linear, "load_library", fail)
    packed, scale = make_weight(13, 72, 3, 64)
    x = torch.randn(2, 72)
    with pytest.warns(RuntimeWarning, match="Install a C\\+\\+ compiler"):
        y = linear.pot_linear_cpu(x, packed, scale, None, 3, 64, 72, True)
    torch.testing.assert_close(y, pot_linear_reference(x, packed, scale, None, 3, 64, 72, True))
    assert not linear.is_available()
    assert ops.resolve("cpu", "auto") is pot_linear_reference  # auto falls back quietly afterwards
    with pytest.raises(RuntimeError, match="not available"):
        ops.resolve("cpu", "cpu")


def test_builder_errors_name_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_POT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_LIB", None)
    monkeypatch.setattr(build, "compiler", lambda: None)
    with pytest.raises(KernelBuildError, match="no C\\+\\+ compiler"):
        build.load_library()
    monkeypatch.setattr(build, "compiler", lambda: "false")  # a "compiler" that always fails
    with pytest.raises(KernelBuildError, match="false failed"):
        build.load_library()


def test_import_does_not_compile(monkeypatch):
    """Re-running the registration module with a builder that fails proves importing never builds."""
    import importlib

    import optimum_pot.kernels.cpu as cpu_pkg

    def fail():
        raise AssertionError("the kernel was compiled at import")

    monkeypatch.setattr(cpu_pkg, "load_library", build.load_library)  # restored after the reload rebinds it
    monkeypatch.setattr(build, "load_library", fail)
    importlib.reload(cpu_pkg)
    assert ops._KERNELS[("cpu", "cpu")][0] is linear.pot_linear_cpu


# --- backend="cpu_int8": int8 activations, integer accumulation (decode rows); the fp32 path otherwise ---


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 12], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_int8_matches_its_reference(kernel, bits, shape, m, has_bias):
    """Equal (fp32 accumulation tolerance) to the reference on int8-rounded activations where the integer path runs
    (group size a multiple of 64), and to the plain reference where it falls back to fp32 (g100)."""
    n, k, g = shape
    packed, scale = make_weight(n, k, bits, g, seed=bits)
    x = torch.randn(m, k) * torch.logspace(-2, 1, k)  # columns of very different magnitude: per-block scales matter
    bias = torch.randn(n) if has_bias else None
    y = linear.pot_linear_cpu_int8(x, packed, scale, bias, bits, g, k, True)
    integer = build.load_library().pot_cpu_i8_supported(bits, g) == 1
    assert integer == (g % 64 == 0)
    xr = fake_quantize_activations_int8(x) if integer else x
    ref = pot_linear_reference(xr, packed, scale, bias, bits, g, k, True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    exact = pot_linear_reference(x, packed, scale, bias, bits, g, k, True)
    assert ((y - exact).norm() / exact.norm()).item() < (2e-2 if integer else 1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_int8_zero_level_off_bf16_and_prefill(kernel, bits):
    packed, scale = make_weight(31, 256, bits, 64, seed=3)
    x = torch.randn(5, 256)
    y = linear.pot_linear_cpu_int8(x, packed, scale, None, bits, 64, 256, False)
    ref = pot_linear_reference(fake_quantize_activations_int8(x), packed, scale, None, bits, 64, 256, False)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    yb = linear.pot_linear_cpu_int8(x.bfloat16(), packed, scale, None, bits, 64, 256, True)
    assert yb.dtype == torch.bfloat16
    big = torch.randn(40, 256)  # prefill rows take the exact fp32 GEMM path
    ref = pot_linear_reference(big, packed, scale, None, bits, 64, 256, True)
    y = linear.pot_linear_cpu_int8(big, packed, scale, None, bits, 64, 256, True)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_int8_nonfinite_activations_give_nan(kernel):
    packed, scale = make_weight(8, 128, 4, 64)
    x = torch.randn(2, 128)
    x[0, 70] = float("inf")
    x[1, 3] = float("nan")
    y = linear.pot_linear_cpu_int8(x, packed, scale, None, 4, 64, 128, True)
    assert torch.isnan(y).all()
    assert torch.isnan(fake_quantize_activations_int8(x)[0, 64:]).all()


def test_int8_backend_through_config_and_op(kernel):
    from conftest import make_tiny_llama

    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64, backend="cpu_int8"))
    ids = torch.randint(0, 256, (1, 6))
    assert ops.resolve("cpu", "cpu_int8") is linear.pot_linear_cpu_int8
    with torch.no_grad():
        logits = model(ids).logits
        exact = set_backend(model, "cpu")(ids).logits
    assert model.config.quantization_config.backend == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "int8")
    assert torch.isfinite(logits).all()
    assert ((logits - exact).norm() / exact.norm()).item() < 0.05
    torch.library.opcheck(
        torch.ops.optimum_pot.pot_linear.default,
        (torch.randn(1, 72), *make_weight(13, 72, 4, 64), None, 4, 64, 72, True, "cpu_int8"),
    )


def test_kernel_thread_count(monkeypatch):
    """``set_num_threads`` overrides; ``None`` returns to ``$OPTIMUM_POT_NUM_THREADS`` (read once), else torch's."""
    monkeypatch.setattr(linear, "_THREADS", [])
    monkeypatch.setattr(linear, "_ENV_THREADS", [])
    monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "3")
    assert linear.num_threads() == 3
    linear.set_num_threads(1)
    assert linear.num_threads() == 1
    linear.set_num_threads(None)
    monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "5")  # read once: a later change does not count
    assert linear.num_threads() == 3
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="positive integer or None"):
            linear.set_num_threads(bad)


def test_bad_thread_env_warns_and_follows_torch(monkeypatch):
    monkeypatch.setattr(linear, "_THREADS", [])
    monkeypatch.setattr(linear, "_ENV_THREADS", [])
    monkeypatch.setenv("OPTIMUM_POT_NUM_THREADS", "two")
    with pytest.warns(RuntimeWarning, match="set it to a positive integer"):
        assert linear.num_threads() == torch.get_num_threads()
