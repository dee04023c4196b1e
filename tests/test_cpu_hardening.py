"""No input reaches the CPU kernels' memory with the wrong size: property tests over shapes, bits, groups, level
sets and dtypes (valid ones equal the reference, wrong ones raise a clear error, nothing crashes), at every entry
point: the layer, the kernel functions, the torch operator and the C ABI's last guard."""

import ctypes

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from optimum_pot.format.groups import num_groups
from optimum_pot.format.level_set import LevelSet
from optimum_pot.format.packing import pack, packed_row_bytes, unpack
from optimum_pot.format.registry import from_id
from optimum_pot.kernels.cpu import ctypes_kernel, linear
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear

from .level_sets import ALL_LEVEL_SETS

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OP_ERRORS = (ValueError, RuntimeError)  # TORCH_CHECK_VALUE / TORCH_CHECK


@st.composite
def layer_case(draw):
    """A valid call: level set, N, K, group size, M, activation dtype, bias, non-contiguous inputs."""
    ls = draw(st.sampled_from(ALL_LEVEL_SETS))
    k = draw(st.integers(1, 300))
    group = draw(st.sampled_from([k, 1, 7, 32, 64, 100, 128, 192]))
    m = draw(st.sampled_from([0, 1, 2, 7, 12, 13, 40]))
    return dict(ls=ls, n=draw(st.integers(1, 40)), k=k, group=min(group, k), m=m,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])),
                bias=draw(st.booleans()), strided=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))  # fmt: skip


def make(case):
    ls, n, k, group = case["ls"], case["n"], case["k"], case["group"]
    gen = torch.Generator().manual_seed(case["seed"])
    codes = torch.randint(0, 1 << ls.bits, (n, k), dtype=torch.uint8, generator=gen)
    packed = pack(codes, ls.bits)
    g = num_groups(k, group)
    scale = (torch.rand(n, g, generator=gen) * 0.1).half()
    offset = ((torch.rand(n, g, generator=gen) - 0.5) * 0.05).half() if ls.offset else None
    bias = torch.randn(n, generator=gen) if case["bias"] else None
    x = torch.randn(case["m"], k, generator=gen)
    if case["strided"]:  # non-contiguous views of the same values
        x = torch.cat([x, x], 1)[:, ::2] if k > 0 else x
        packed = torch.cat([packed, packed], 1)[:, : packed.shape[1]]
        scale = scale.t().contiguous().t()
    return x.to(case["dtype"]), packed, scale, offset, bias


@FUZZ
@given(case=layer_case(), backend=st.sampled_from(["cpu", "cpu_int8", "auto"]))
def test_kernels_equal_the_reference_on_random_layers(lib, case, backend):
    from optimum_pot.format.activations import fake_quantize_activations_int8

    x, packed, scale, offset, bias = make(case)
    ls, group, k = case["ls"], case["group"], case["k"]
    fn = {"cpu": linear.pot_linear_cpu, "cpu_int8": linear.pot_linear_cpu_int8, "auto": linear.pot_linear_cpu_auto}
    y = fn[backend](x, packed, scale, offset, bias, ls, group, k)
    assert y.dtype == x.dtype and y.shape == (case["m"], case["n"])
    xf = x.float()
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
    if backend != "cpu" and linear.int8_path(case["m"], group, ls):
        xf = fake_quantize_activations_int8(xf)
    elif backend != "cpu" and linear.bf16_path(case["m"]):  # AMX CPUs: the prefill GEMM runs in bfloat16
        xf, tol = xf.bfloat16(), 2e-2
    ref = pot_linear_reference(xf, packed, scale, offset, bias, ls, group, k).float()
    top = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(y.float(), ref.to(x.dtype).float(), rtol=tol, atol=tol * (1 + top))


def _valid_args(case):
    x, packed, scale, offset, bias = make(case)
    ls = case["ls"]
    return [x, packed, scale, offset, bias, ls.values, -1 if ls.int8_shift is None else ls.int8_shift, case["group"],
            case["k"], False]  # fmt: skip


# Each breaks one argument of a valid operator call (index into the argument list, replacement builder).
BREAKERS = {
    "packed row bytes": (1, lambda a: a[1][:, :-1] if a[1].shape[1] > 1 else a[1].repeat(1, 2)),
    "packed rows": (1, lambda a: a[1][:-1] if a[1].shape[0] > 1 else a[1].repeat(2, 1)),
    "packed dtype": (1, lambda a: a[1].to(torch.int16)),
    "packed 1-D": (1, lambda a: a[1].reshape(-1)),
    "scale groups": (2, lambda a: torch.cat([a[2], a[2]], 1)),
    "scale dtype": (2, lambda a: a[2].to(torch.bfloat16)),
    "scale rows": (2, lambda a: a[2][:-1] if a[2].shape[0] > 1 else a[2].repeat(2, 1)),
    "offset missing shape": (3, lambda a: torch.zeros(a[2].shape[0], a[2].shape[1] + 1, dtype=torch.half)),
    "bias shape": (4, lambda a: torch.zeros(a[1].shape[0] + 1)),
    "bias dtype": (4, lambda a: torch.zeros(a[1].shape[0], dtype=torch.int64)),
    "x last dim": (0, lambda a: torch.zeros(3, a[8] + 1)),
    "x 0-dim": (0, lambda a: torch.tensor(1.0)),
    "x integer": (0, lambda a: a[0].to(torch.int32)),
    "levels count": (5, lambda a: tuple(a[5]) + (1.0,)),
    "levels 32 (bits=5)": (5, lambda a: tuple(float(i) for i in range(32))),
    "levels not finite": (5, lambda a: (float("inf"),) + tuple(a[5][1:])),
    "int8 shift": (6, lambda a: 16),
    "int8 shift wrong": (6, lambda a: 0 if any(v != int(v) for v in a[5]) else 12),
    "group size": (7, lambda a: 0),
    "group size mismatch": (7, lambda a: a[7] + 1 if num_groups(a[8], a[7] + 1) != num_groups(a[8], a[7]) else -3),
    "in features": (8, lambda a: 0),
    "in features mismatch": (8, lambda a: a[8] + 8),
}


@FUZZ
@given(case=layer_case(), broken=st.sampled_from(sorted(BREAKERS)), int8=st.booleans())
def test_wrong_operator_arguments_raise(lib, case, broken, int8):
    args = _valid_args(case)
    args[9] = int8
    index, breaker = BREAKERS[broken]
    args[index] = breaker(args)
    with pytest.raises(OP_ERRORS):
        torch.ops.optimum_pot_cpu.linear(*args)
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(OP_ERRORS):  # the Meta (fake) implementation runs the same checks
        torch.ops.optimum_pot_cpu.linear(*meta)


def _consistent(a, values) -> bool:
    """What pot_cpu_check_linear accepts (a replica in Python of the C rules)."""
    big = 1 << 40
    if a.bits not in (2, 3, 4) or a.K < 1 or a.group_size < 1 or a.M < 0 or a.N < 0 or max(a.K, a.group_size) > big:
        return False
    if a.M > big // a.K or a.N > big // a.K or (a.N and a.M > big // a.N):
        return False
    if a.row_bytes != packed_row_bytes(a.K, a.bits) or a.G != num_groups(a.K, a.group_size):
        return False
    if not -1 <= a.int8_shift <= 15:
        return False
    if a.N > 0 and (not a.packed or not a.scale):  # an empty tensor's data pointer may be null
        return False
    if a.M > 0 and a.N > 0 and (not a.x or not a.y):  # pot_cpu_check_linear: rows to compute need both buffers
        return False
    scaled = [abs(v) * 2**a.int8_shift for v in values[: 1 << a.bits]]
    return a.int8_shift == -1 or all(q <= 128 and q == int(q) for q in scaled)


@FUZZ
@given(case=layer_case(), field=st.sampled_from(["K", "N", "M", "row_bytes", "G", "group_size", "bits", "int8_shift"]),
       delta=st.sampled_from([-2, -1, 1, 5, 1 << 45]))  # fmt: skip
@example(case=dict(ls=from_id("int:2"), n=1, k=1, group=1, m=0, dtype=torch.float32, bias=False, strided=False, seed=0),
         field="M", delta=1)  # an empty input (null data pointer) given a row: refused, found by CI  # fmt: skip
def test_c_abi_refuses_inconsistent_sizes(lib, case, field, delta):
    """The last guard: the C entry points re-check sizes against each other before reading memory (buffer
    lengths themselves are the operator's to check: the C ABI does not receive them)."""
    ctypes_kernel.bind(lib)
    x, packed, scale, offset, bias = make(case)
    x, packed, scale = x.float().contiguous(), packed.contiguous(), scale.contiguous()
    ls = case["ls"]
    values = torch.tensor(ls.values + (0.0,) * (16 - len(ls.values)), dtype=torch.float32)  # 16: bits may grow
    y = torch.empty(case["m"], case["n"])
    args = ctypes_kernel.make_args(x, packed, scale, offset, bias, values, ls.bits, ls.int8_shift, case["group"],
                                   case["k"], y, 1)  # fmt: skip
    assert lib.pot_cpu_check_linear(ctypes.byref(args)) == 0
    setattr(args, field, getattr(args, field) + delta)
    consistent = _consistent(args, values.tolist())
    assert (lib.pot_cpu_check_linear(ctypes.byref(args)) == 0) == consistent
    if not consistent:  # refused before any memory is read (a consistent one may not fit the buffers: not run)
        for fn in (lib.pot_cpu_linear, lib.pot_cpu_linear_i8):
            assert fn(ctypes.byref(args)) != 0


@pytest.mark.parametrize("bad_k", [100, 200, 129, 1])
def test_layer_rejects_inputs_of_the_wrong_width(lib, bad_k):
    q = PoTLinear.from_float(torch.nn.Linear(128, 16), "sp2:4:offset", 64, backend="cpu")
    with torch.no_grad(), pytest.raises(RuntimeError, match="in_features=128"):
        q(torch.randn(3, bad_k))


def test_layer_rejects_tampered_weights(lib):
    q = PoTLinear.from_float(torch.nn.Linear(128, 16), "pot:4", 64, backend="cpu")
    x = torch.randn(2, 128)
    tampered = (("weight", torch.zeros(16, 32, dtype=torch.uint8)), ("weight", torch.zeros(15, 64, dtype=torch.uint8)),
                ("weight_scale", torch.zeros(16, 3, dtype=torch.half)), ("weight", torch.zeros(16, 64)))  # fmt: skip
    for name, bad in tampered:
        kept = getattr(q, name).data
        getattr(q, name).data = bad
        with torch.no_grad(), pytest.raises(OP_ERRORS):
            q(x)
        getattr(q, name).data = kept
    with pytest.raises(ValueError, match="bits must be one of"):
        PoTLinear(128, 16, level_set=LevelSet("pot", 5, tuple(float(i) for i in range(32))))


@FUZZ
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(0, 9), k=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, k, seed):
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_row_bytes(k, bits))
    assert torch.equal(unpack(packed, bits, k), codes)
