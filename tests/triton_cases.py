"""Triton kernel cases, run on the CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

Not collected by the normal run (the name has no ``test_`` prefix): ``tests/test_triton_kernel.py`` runs this file
in a subprocess with the variable set, because it must be set before the kernels are decorated. Shapes are tiny
because the interpreter is slow; K and N are odd and the last scale group is partial. Every registered level set
(``tests/level_sets.py``) runs: the decode bit-exactly at the float16 edges, and the matmul over a sample of the
matrix (each default level set at every M and both dtypes, each other one at one M).
"""

import os

import pytest
import torch

import optimum_pot  # noqa: F401  (registers the kernels)
from optimum_pot.format.groups import num_groups
from optimum_pot.format.packing import pack
from optimum_pot.format.registry import get_level_set
from optimum_pot.format.weights import dequantize_weight
from optimum_pot.library.ops import available_backends, pot_linear
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear

from .level_sets import ALL_LEVEL_SETS, DEFAULT_LEVEL_SETS, ids

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/test_triton_kernel.py with TRITON_INTERPRET=1", allow_module_level=True)

from optimum_pot.kernels.triton import launch  # noqa: E402  (after the interpreter check)

K, N, GROUP = 77, 37, 32  # odd K and N; 77 = 2·32 + 13, a partial last group
DTYPES = [torch.float16, torch.bfloat16]
M_VALUES = [1, 5, 33, 128]  # the GEMV (M ≤ 8, split-K here) and the GEMM
# Output tolerance: the kernel and the reference round the same float32-accumulated sums, in a different order.
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
OTHER_LEVEL_SETS = [ls for ls in ALL_LEVEL_SETS if ls not in DEFAULT_LEVEL_SETS]
# The two-term path with offsets: the 4-bit default level set with the most distinct term exponents (positive and
# negative ones, e.g. sp2's), read from the registry, never hard-coded.
TWO_TERM = max((ls for ls in DEFAULT_LEVEL_SETS if ls.max_terms == 2 and ls.offset and ls.bits == 4),
               key=lambda ls: len({e for terms in ls.terms for _, e in terms}))  # fmt: skip
POT4 = get_level_set("pot", 4)


def random_weight(ls, n=N, k=K, group=GROUP, scale=None, seed=0):
    """Random codes (every level, the zero code included) packed canonically, float16 scales and offsets."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << ls.bits, (n, k), generator=g, dtype=torch.uint8)
    if scale is None:
        scale = (torch.rand(n, num_groups(k, group), generator=g) * 0.5 + 0.01).half()
    offset = (torch.randn(scale.shape, generator=g) * 0.1).half() if ls.offset else None
    return pack(codes, ls.bits), scale, offset


def assert_matches_reference(y, x, packed, scale, offset, bias, ls, group=GROUP, k=K):
    ref = pot_linear_reference(x, packed, scale, offset, bias, ls, group, k)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=RTOL[x.dtype], atol=RTOL[x.dtype] * ref.abs().mean().item())


def op_cases():
    """A sample of level sets × M × dtypes (the interpreter is slow): each default level set with a GEMV and a GEMM
    M, every M and both dtypes met by several sets; each other level set once (its decode is checked in full by the
    edge tests below)."""
    cases = [(ls, M_VALUES[(i + j) % 2 + 2 * j], DTYPES[(i // 2 + j) % 2]) for i, ls in enumerate(DEFAULT_LEVEL_SETS)
             for j in range(2)]  # fmt: skip
    cases += [(ls, M_VALUES[i % 4], DTYPES[i // 4 % 2]) for i, ls in enumerate(OTHER_LEVEL_SETS)]
    return [pytest.param(*c, id=f"{c[0].id}-M{c[1]}-{c[2]}") for c in cases]


@pytest.mark.parametrize("ls,m,dtype", op_cases())
def test_op_matches_reference(ls, m, dtype):
    """The registered op with backend='triton' (auto GEMV/GEMM pick) equals the reference op."""
    packed, scale, offset = random_weight(ls, seed=ls.bits + m)
    x = torch.randn(m, K).to(dtype)
    bias = torch.randn(N).to(dtype)
    y = pot_linear(x, packed, scale, offset, bias, ls.id, GROUP, K, "triton")
    assert_matches_reference(y, x, packed, scale, offset, bias, ls)


@pytest.mark.parametrize("ls,dtype", [(ls, DTYPES[i % 2]) for i, ls in enumerate(DEFAULT_LEVEL_SETS)],
                         ids=lambda v: str(v))  # fmt: skip
def test_dequantize_is_bit_exact(ls, dtype):
    """The in-register decode (exponent-field adds, offsets added in float32) gives exactly the reference weights
    (every code of every level set, in every dtype, is also decoded by the edge-scale tests below)."""
    packed, scale, offset = random_weight(ls, seed=10 + ls.bits)
    w = launch.dequantize(launch.PackedWeight(packed, scale, offset, ls, GROUP, K), dtype)
    assert torch.equal(w, dequantize_weight(packed, scale, offset, ls, GROUP, K, dtype))


@pytest.mark.parametrize("kernel,m,split,bias", [("gemm", 1, None, True), ("gemm", 5, None, False),
                                                 ("gemv", 1, 1, False), ("gemv", 3, 3, True), ("gemv", 8, 2, False),
                                                 ("gemv", 1, 5, True)], ids=lambda v: str(v))  # fmt: skip
def test_forced_kernels(kernel, m, split, bias):
    """Both kernels at the small-M sizes, with and without split-K, with and without a bias."""
    packed, scale, offset = random_weight(TWO_TERM, seed=m)
    x = torch.randn(m, K).half()
    b = torch.randn(N).half() if bias else None
    weight = launch.PackedWeight(packed, scale, offset, TWO_TERM, GROUP, K)
    y = launch.linear(x, weight, b, kernel=kernel, split=split)
    assert_matches_reference(y, x, packed, scale, offset, b, TWO_TERM)


@pytest.mark.parametrize("group,m", [(8, 1), (16, 33), (50, 1), (77, 33), (128, 1), (128, 33)], ids=str)
def test_group_sizes(group, m):
    """Group sizes smaller than, not dividing, equal to and larger than K: both the one-scale-per-row-per-tile path
    (the K tile divides the group) and the per-column scale and offset gather (it does not), in both kernels."""
    ls = TWO_TERM if m == 1 else POT4
    packed, scale, offset = random_weight(ls, group=group, seed=group)
    x = torch.randn(m, K).half()
    y = pot_linear(x, packed, scale, offset, None, ls.id, group, K, "triton")
    assert_matches_reference(y, x, packed, scale, offset, None, ls, group)


# Scales at the edges of float16: zero (both signs), the smallest subnormal, 1e-7 (subnormal), the smallest normal,
# 1, a negative one (the op accepts it), huge; offsets likewise, so that s·L + z rounds at every edge.
EDGE_SCALES = [0.0, -0.0, 2.0**-24, 1e-7, 2.0**-14, 1.0, -0.5, 6e4, 65504.0]
EDGE_OFFSETS = [0.0, 1.0, -(2.0**-24), 3e-5, -(2.0**-14), 0.5, 1e4, -6e4, 2.0**-10]


def edge_weight(ls, scales, scale_dtype):
    """Every code once per row, one row (and one group) per scale: ``[S, 2^bits]``."""
    codes = torch.arange(1 << ls.bits, dtype=torch.uint8).repeat(len(scales), 1)
    scale = torch.tensor(scales, dtype=scale_dtype)[:, None]  # [S, 1]
    offset = torch.tensor(EDGE_OFFSETS[: len(scales)], dtype=torch.float16)[:, None] if ls.offset else None
    return pack(codes, ls.bits), scale, offset


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_exponent_arithmetic_tiny_and_huge_scales(ls):
    """Every code of every edge scale decodes exactly, into each activation dtype: no exponent-field underflow or
    overflow for negative or positive term exponents, subnormals round right."""
    k = 1 << ls.bits
    packed, scale, offset = edge_weight(ls, EDGE_SCALES, torch.float16)
    for dtype in DTYPES:  # float32 outputs: the next test
        w = launch.dequantize(launch.PackedWeight(packed, scale, offset, ls, k, k), dtype)
        assert torch.equal(w, dequantize_weight(packed, scale, offset, ls, k, k, dtype))
    assert torch.isfinite(w).all()  # bfloat16 holds 65504 · 8 + 6e4 (float16 does not, in both)
    if not ls.offset:  # 2^-24 times a level below 1 is below float16's range, not below bfloat16's
        assert (w[2] != 0).sum() == sum(v != 0 for v in ls.values)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_non_half_scales_at_float32_edges(ls):
    """bfloat16/float32 scales can be float32-subnormal, tiny or huge, so terms may leave float32's exponent range
    either way: the guarded lanes fall back to an exact multiply (float32 outputs: nothing rounds them away)."""
    k = 1 << ls.bits
    edges = {
        torch.bfloat16: [0.0, 1e-40, 2.0**-126, 2.0**-120, 1.0, 2.0**126, 3e38, -(2.0**-125)],
        torch.float32: [0.0, 1e-40, 2.0**-126, 3e-39, 1.0, 2.0**126, 3.4e38, -(2.0**-125)],
    }
    for scale_dtype, scales in edges.items():
        packed, scale, offset = edge_weight(ls, scales, scale_dtype)
        w = launch.dequantize(launch.PackedWeight(packed, scale, offset, ls, k, k), torch.float32)
        assert torch.equal(w, dequantize_weight(packed, scale, offset, ls, k, k, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ls", [POT4, TWO_TERM], ids=ids)
def test_matmul_with_tiny_and_huge_groups(ls, dtype):
    """A layer whose groups alternate between subnormal and near-maximal float16 scales."""
    packed, _, offset = random_weight(ls, seed=3)
    huge = 6e4 / ls.max_abs  # the largest level stays below float16's maximum
    scale = torch.tensor([1e-7, huge, 2.0**-24], dtype=torch.float16).repeat(N, 1)  # [N, 3]
    x = (torch.randn(33, K) * 1e-3).to(dtype)
    y = pot_linear(x, packed, scale, offset, None, ls.id, GROUP, K, "triton")
    assert torch.isfinite(y).all()
    assert_matches_reference(y, x, packed, scale, offset, None, ls)


def test_float32_activations_and_odd_layouts():
    """float32 activations, a 3-D input and a non-contiguous one."""
    packed, scale, offset = random_weight(TWO_TERM, seed=7)
    x = torch.randn(K, 2, 3).permute(1, 2, 0)  # [2, 3, K], non-contiguous
    y = pot_linear(x, packed, scale, offset, None, TWO_TERM.id, GROUP, K, "triton")
    assert y.shape == (2, 3, N)
    assert_matches_reference(y, x, packed, scale, offset, None, TWO_TERM)


def test_uniform_int4_baseline():
    """The benchmark's uniform ``(q − z)·s`` variant of the same kernels."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scale = (torch.rand(N, 3, generator=g) * 0.1).half()
    zero = torch.randint(0, 16, (N, 3), generator=g).half()
    weight = launch.PackedWeight(pack(q, 4), scale, zero, get_level_set("int", 4), GROUP, K, uniform=True)
    full = lambda t: t.float().repeat_interleave(GROUP, dim=1)[:, :K]
    expected = ((q.float() - full(zero)) * full(scale)).half()
    assert torch.equal(launch.dequantize(weight, torch.float16), expected)
    for m in (1, 33):
        x = torch.randn(m, K).half()
        torch.testing.assert_close(launch.linear(x, weight, None), x @ expected.t(), rtol=2e-3, atol=2e-3)


def test_module_and_autograd_through_triton_backend():
    """PoTLinear(backend='triton') forward; gradients flow to x through the op's autograd formula."""
    lin = torch.nn.Linear(K, N)
    q = PoTLinear.from_float(lin, TWO_TERM, GROUP, backend="triton")
    ref = PoTLinear.from_float(lin, TWO_TERM, GROUP, backend="reference")
    x = torch.randn(4, K, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_compiled_op_uses_triton_backend():
    """torch.compile over the op (dispatching to the interpreted Triton kernel) gives the eager result and grads."""
    packed, scale, offset = random_weight(TWO_TERM, seed=5)
    x = torch.randn(5, K).half().requires_grad_()
    f = lambda x: pot_linear(x, packed, scale, offset, None, TWO_TERM.id, GROUP, K, "triton")
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
        (dict(k=90), "bytes per row"),
        (dict(group=16), "Scales must be"),
        (dict(x_dtype=torch.int32), "activations"),
        (dict(kernel="gemv", m=9), "at most 8 rows"),
        (dict(kernel="fast"), "kernel must be"),
        (dict(offset=torch.zeros(N, 2)), "Offsets must be"),
        (dict(ls=POT4), "takes no offsets"),
        (dict(offset=None), "needs offsets"),
        (dict(device="meta"), "one device"),
    ],
    ids=["packed-shape", "scale-shape", "int-activations", "gemv-rows", "kernel-name", "offset-shape",
         "offset-not-taken", "offset-missing", "device"],
)  # fmt: skip
def test_input_errors(change, match):
    packed, scale, offset = random_weight(TWO_TERM)
    weight = launch.PackedWeight(packed, scale, change.get("offset", offset), change.get("ls", TWO_TERM),
                                 change.get("group", GROUP), change.get("k", K))  # fmt: skip
    x = torch.ones(change.get("m", 2), change.get("k", K), dtype=change.get("x_dtype", torch.float16))
    x = x.to(change.get("device", "cpu"))
    with pytest.raises(ValueError, match=match):
        launch.linear(x, weight, None, kernel=change.get("kernel", "auto"))
