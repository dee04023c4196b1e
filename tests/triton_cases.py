"""Triton kernel cases, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

Not collected by the normal run (the name has no ``test_`` prefix): ``tests/test_triton_kernel.py`` runs this file
in a subprocess with the variable set, because it must be set before the kernels are decorated. Shapes are tiny
because the interpreter is slow; K and N are odd and the last scale group is partial.
"""

import os

import pytest
import torch

import optimum_pot  # noqa: F401  (registers the kernels)
from optimum_pot.format.levels import num_groups
from optimum_pot.format.packing import pack
from optimum_pot.library.ops import available_backends, pot_linear
from optimum_pot.library.reference import dequantize_weight, pot_linear_reference
from optimum_pot.nn import PoTLinear

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_triton_kernel.py with TRITON_INTERPRET=1", allow_module_level=True)

from optimum_pot.kernels.triton import launch  # noqa: E402  (after the interpreter check)

K, N, GROUP = 77, 37, 32  # odd K and N; 77 = 2·32 + 13, a partial last group
DTYPES = [torch.float16, torch.bfloat16]
# Output tolerance: the kernel and the reference round the same float32-accumulated sums, in a different order.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def random_weight(bits, n=N, k=K, group=GROUP, zero_level=True, scale=None, seed=0):
    """Random codes (every level, the zero code included) packed canonically, and float16 scales."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    if scale is None:
        scale = (torch.rand(n, num_groups(k, group), generator=g) * 0.5 + 0.01).half()
    return pack(codes, bits), scale


def assert_matches_reference(y, x, packed, scale, bias, bits, group, k, zero_level):
    ref = pot_linear_reference(x, packed, scale, bias, bits, group, k, zero_level)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=RTOL[x.dtype], atol=RTOL[x.dtype] * ref.abs().mean().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 5, 33, 128], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_op_matches_reference(bits, m, dtype):
    """The registered op with backend='triton' (auto GEMV/GEMM pick) equals the reference op."""
    packed, scale = random_weight(bits, seed=bits)
    x = torch.randn(m, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = pot_linear(x, packed, scale, bias, bits, GROUP, K, True, "triton")
    assert_matches_reference(y, x, packed, scale, bias, bits, GROUP, K, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("zero_level", [True, False], ids=["zero", "nozero"])
def test_dequantize_is_bit_exact(bits, zero_level, dtype):
    """The in-register decode (exponent subtraction + sign XOR) gives exactly the reference weights."""
    packed, scale = random_weight(bits, zero_level=zero_level, seed=10 + bits)
    w = launch.dequantize(launch.PackedWeight(packed, scale, None, bits, GROUP, K, zero_level), dtype)
    assert torch.equal(w, dequantize_weight(packed, scale, bits, GROUP, K, zero_level, dtype))


@pytest.mark.parametrize("kernel,m,split", [("gemm", 1, None), ("gemm", 5, None), ("gemv", 1, 1), ("gemv", 3, 3),
                                            ("gemv", 8, 2), ("gemv", 1, 5)], ids=lambda v: str(v))  # fmt: skip
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forced_kernels(kernel, m, split, bias):
    """Both kernels at the small-M sizes, with and without split-K, with and without a bias."""
    packed, scale = random_weight(3, seed=m)
    x = torch.randn(m, K).half()
    b = torch.randn(N).half() if bias else None
    weight = launch.PackedWeight(packed, scale, None, 3, GROUP, K, True)
    y = launch.linear(x, weight, b, kernel=kernel, split=split)
    assert_matches_reference(y, x, packed, scale, b, 3, GROUP, K, True)


@pytest.mark.parametrize("m", [1, 33], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("group", [8, 16, 50, 77, 128], ids=lambda g: f"g{g}")
def test_group_sizes(group, m):
    """Group sizes smaller than, not dividing, equal to and larger than K: both the one-scale-per-row-per-tile path
    (the K tile divides the group) and the per-column scale gather (it does not)."""
    packed, scale = random_weight(4, group=group, seed=group)
    x = torch.randn(m, K).half()
    y = pot_linear(x, packed, scale, None, 4, group, K, True, "triton")
    assert_matches_reference(y, x, packed, scale, None, 4, group, K, True)


# Scales at the edges of float16: zero, the smallest subnormal, 1e-7 (subnormal), the smallest normal, 1, huge.
EDGE_SCALES = [0.0, 2.0**-24, 1e-7, 2.0**-14, 1.0, 6e4, 65504.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("zero_level", [True, False], ids=["zero", "nozero"])
def test_exponent_arithmetic_tiny_and_huge_scales(zero_level, dtype):
    """Every code of every edge scale decodes exactly: no exponent underflow or overflow, subnormals round right."""
    bits = 4
    codes = torch.arange(16, dtype=torch.uint8).repeat(len(EDGE_SCALES), 1)  # [S, 16]: one row per scale
    scale = torch.tensor(EDGE_SCALES, dtype=torch.float16)[:, None]  # [S, 1]: one group per row
    packed = pack(codes, bits)
    weight = launch.PackedWeight(packed, scale, None, bits, 16, 16, zero_level)
    w = launch.dequantize(weight, dtype)
    expected = dequantize_weight(packed, scale, bits, 16, 16, zero_level, dtype)
    assert torch.equal(w, expected)
    assert torch.isfinite(w).all()
    if dtype != torch.float16:  # these keep 2^-24 · 2^-7, which float16 flushes to zero
        assert (w[1].abs() > 0).sum() == (14 if zero_level else 16)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_non_half_scales_below_float16_range(scale_dtype):
    """bfloat16/float32 scales can underflow the float32 exponent field; the guarded lanes fall back exactly."""
    tiny = [0.0, 1e-40, 2.0**-126, 2.0**-120, 3e-39, 1.0]  # float32 subnormals and tiny normals
    codes = torch.arange(16, dtype=torch.uint8).repeat(len(tiny), 1)
    scale = torch.tensor(tiny, dtype=scale_dtype)[:, None]
    packed = pack(codes, 4)
    w = launch.dequantize(launch.PackedWeight(packed, scale, None, 4, 16, 16, False), torch.float32)
    assert torch.equal(w, dequantize_weight(packed, scale, 4, 16, 16, False, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_with_tiny_and_huge_groups(dtype):
    """A layer whose groups alternate between subnormal and near-maximal float16 scales."""
    packed, _ = random_weight(4, seed=3)
    scale = torch.tensor([1e-7, 6e4, 2.0**-24], dtype=torch.float16).repeat(N, 1)  # [N, 3]
    x = (torch.randn(33, K) * 1e-3).to(dtype)
    y = pot_linear(x, packed, scale, None, 4, GROUP, K, True, "triton")
    assert torch.isfinite(y).all()
    assert_matches_reference(y, x, packed, scale, None, 4, GROUP, K, True)


def test_float32_activations_and_odd_layouts():
    """float32 activations, a 3-D input and a non-contiguous one."""
    packed, scale = random_weight(2, seed=7)
    x = torch.randn(K, 2, 3).permute(1, 2, 0)  # [2, 3, K], non-contiguous
    y = pot_linear(x, packed, scale, None, 2, GROUP, K, True, "triton")
    assert y.shape == (2, 3, N)
    assert_matches_reference(y, x, packed, scale, None, 2, GROUP, K, True)


def test_uniform_int4_baseline():
    """The benchmark's uniform ``(q − z)·s`` variant of the same kernels."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, 3, generator=g) * 0.1).half()
    zero = torch.randint(0, 16, (N, 3), generator=g).half()
    weight = launch.PackedWeight(pack(q, 4), scale, zero, 4, GROUP, K, False)
    full = lambda t: t.float().repeat_interleave(GROUP, dim=1)[:, :K]
    expected = ((q.float() - full(zero)) * full(scale)).half()
    assert torch.equal(launch.dequantize(weight, torch.float16), expected)
    for m in (1, 33):
        x = torch.randn(m, K).half()
        torch.testing.assert_close(launch.linear(x, weight, None), x @ expected.t(), rtol=2e-3, atol=2e-3)


def test_module_and_autograd_through_triton_backend():
    """PoTLinear(backend='triton') forward; gradients flow to x through the op's autograd formula."""
    lin = torch.nn.Linear(K, N)
    q = PoTLinear.from_float(lin, 3, GROUP, backend="triton")
    ref = PoTLinear.from_float(lin, 3, GROUP, backend="reference")
    x = torch.randn(4, K, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_compiled_op_uses_triton_backend():
    """torch.compile over the op (dispatching to the interpreted Triton kernel) gives the eager result and grads."""
    packed, scale = random_weight(4, seed=5)
    x = torch.randn(5, K).half().requires_grad_()
    f = lambda x: pot_linear(x, packed, scale, None, 4, GROUP, K, True, "triton")
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, f(x), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    (expected,) = torch.autograd.grad(f(x).float().sum(), x)
    torch.testing.assert_close(grad, expected)


def test_registered_on_cpu_under_interpreter():
    assert "triton" in available_backends("cpu")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=5), "bits in"),
        (dict(k=90), "bytes per row"),
        (dict(group=16), "Scales must be"),
        (dict(x_dtype=torch.int32), "activations"),
        (dict(kernel="gemv", m=9), "at most 8 rows"),
        (dict(kernel="fast"), "kernel must be"),
        (dict(zero=torch.zeros(N, 2)), "Zero points must match"),
        (dict(device="meta"), "one device"),
    ],
    ids=["bits", "packed-shape", "scale-shape", "int-activations", "gemv-rows", "kernel-name", "zero-shape", "device"],
)
def test_input_errors(change, match):
    packed, scale = random_weight(4)
    weight = launch.PackedWeight(
        packed, scale, change.get("zero"), change.get("bits", 4), change.get("group", GROUP), change.get("k", K), True
    )
    x = torch.ones(change.get("m", 2), change.get("k", K), dtype=change.get("x_dtype", torch.float16))
    x = x.to(change.get("device", "cpu"))
    with pytest.raises(ValueError, match=match):
        launch.linear(x, weight, None, kernel=change.get("kernel", "auto"))
