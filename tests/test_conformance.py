"""The conformance suite: every (level set × bits × backend available here) passes the same checks.

Adding a level set (a registry family) or a kernel (``register_kernel``) adds its cases here: level sets come from
``tests/level_sets.py``, backends from the op registry, and a backend's comparison rule from :data:`SPECS`
(the Triton kernels run the same checks under the interpreter in ``tests/triton_cases.py``).
"""

import pytest
import torch

from optimum_pot.format.activations import fake_quantize_activations_int8
from optimum_pot.format.packing import pack, unpack
from optimum_pot.kernels.cpu import bf16_path, int8_path
from optimum_pot.library.ops import available_backends, pot_linear, pot_linear_infer
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear

from .level_sets import ALL_LEVEL_SETS, DEFAULT_LEVEL_SETS, ids


def _reduced(x, m, group, ls):
    """cpu_int8: int8 activations per 64 columns at decode rows; bfloat16 activations (so the reference decodes
    the weight in bfloat16 too) at prefill rows on AMX CPUs; else exactly the fp32 computation."""
    if int8_path(m, group, ls):
        return fake_quantize_activations_int8(x), 1e-4, 1e-4
    if bf16_path(m):
        return x.bfloat16(), 1.6e-2, 1.6e-2  # bfloat16 rounds each output to 8 significant bits
    return x, 1e-4, 1e-4


# backend -> f(x, m, group, level set) = (activations the kernel computes with, rtol, atol): the kernel must equal
# the reference on them.
SPECS = {
    "reference": lambda x, m, group, ls: (x, 0.0, 0.0),
    "cpu": lambda x, m, group, ls: (x, 1e-5, 1e-5),
    "cpu_int8": _reduced,
}
BACKENDS = [b for b in SPECS if b in available_backends("cpu")]
# Output SQNR floor (dB) of a calibration-free layer on Gaussian weights, by bits (every level set must pass).
SQNR_FLOOR = {2: 5.0, 3: 11.0, 4: 14.0}


def gaussian_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean())).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
@pytest.mark.parametrize("m", [1, 5, 40], ids=lambda m: f"M{m}")
def test_kernel_equals_reference(ls, backend, m):
    """Odd K and N, a partial last group (200 = 3·64 + 8), bias; group 64 (fast paths) and 50 (portable)."""
    spec = SPECS[backend]
    for group in (64, 50):
        q = PoTLinear.from_float(gaussian_linear(200, 37), ls, group, backend=backend)
        x = torch.randn(m, 200)
        with torch.no_grad():
            y = q(x)
            xr, rtol, atol = spec(x, m, group, ls)
            ref = pot_linear_reference(xr, q.weight, q.weight_scale, q.weight_offset, q.bias, ls, group, 200)
        torch.testing.assert_close(y, ref.float(), rtol=rtol, atol=atol * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ls", DEFAULT_LEVEL_SETS, ids=ids)
def test_kernel_dtypes_and_shapes(ls, backend):
    """bf16 and fp16 activations, a 3-D input, no bias: the kernel returns the input dtype, equal to the
    reference (which decodes in that dtype) within the dtype's rounding."""
    q = PoTLinear.from_float(gaussian_linear(128, 24, bias=False), ls, 64, backend=backend)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 128, dtype=dtype)
        with torch.no_grad():
            y = q(x)
            xr = SPECS[backend](x.float(), 6, 64, ls)[0]
            ref = pot_linear_reference(xr, q.weight, q.weight_scale, q.weight_offset, None, ls, 64, 128).float()
        assert y.dtype == dtype and y.shape == (2, 3, 24)
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_sqnr_floor(ls):
    lin = gaussian_linear(256, 64)
    q = PoTLinear.from_float(lin, ls, 64)
    x = torch.randn(16, 256)
    with torch.no_grad():
        assert sqnr(lin(x), q(x)) > SQNR_FLOOR[ls.bits]


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_pack_unpack_round_trip_is_exact(ls):
    g = torch.Generator().manual_seed(0)
    for k in (1, 7, 8, 77, 200):
        codes = torch.randint(0, 1 << ls.bits, (5, k), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, ls.bits), ls.bits, k), codes)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_state_dict_round_trip_is_bit_exact(ls, tmp_path):
    from safetensors.torch import load_file, save_file

    q = PoTLinear.from_float(gaussian_linear(90, 20), ls, 32)
    save_file(q.state_dict(), tmp_path / "layer.safetensors")
    again = PoTLinear(90, 20, True, ls.id, 32)
    again.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(3, 90)
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
    for name, t in q.state_dict().items():
        assert torch.equal(again.state_dict()[name], t) and again.state_dict()[name].dtype == t.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ls", DEFAULT_LEVEL_SETS, ids=ids)
def test_opcheck(ls, backend):
    q = PoTLinear.from_float(gaussian_linear(70, 16), ls, 32)
    x = torch.randn(3, 70)
    args = (x, q.weight, q.weight_scale, q.weight_offset, q.bias.detach(), ls.id, 32, 70, backend)
    torch.library.opcheck(pot_linear, args)
    torch.library.opcheck(pot_linear_infer, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))  # fmt: skip


@pytest.mark.parametrize("ls", [ls for ls in ALL_LEVEL_SETS if ls.int8_shift is not None], ids=ids)
def test_int8_dot_products_agree(ls, lib):
    """The integer path's two dot products (AVX2 maddubs/madd and AVX512-VNNI vpdpbusd) give bit-identical outputs:
    both sum the same int8 products exactly. Every row blocking (M 1-5), a partial last chunk, offsets, bias."""
    if not lib.pot_cpu_i8_vnni(-1):
        pytest.skip("this CPU (or compiler) has no AVX512-VNNI: only the AVX2 dot product runs here")
    q = PoTLinear.from_float(gaussian_linear(200, 37), ls, 64, backend="cpu_int8")
    try:
        for m in (1, 2, 3, 4, 5):
            x = torch.randn(m, 200)
            outs = []
            for enable in (0, 1):
                lib.pot_cpu_i8_vnni(enable)
                with torch.no_grad():
                    outs.append(q(x))
            assert torch.equal(outs[0], outs[1])
    finally:
        lib.pot_cpu_i8_vnni(1)
