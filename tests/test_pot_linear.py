"""PoTLinear and the reference ``optimum_pot::pot_linear`` op: accuracy, autograd, fake tensors."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from optimum_pot.library.ops import available_backends, pot_linear, pot_linear_infer
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear, quantize

# Minimum SQNR (dB) of the layer output on Gaussian weights, calibration-free, group 64.
MIN_SQNR = {2: 7.0, 3: 12.0, 4: 14.0}


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean())).item()


def gaussian_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,n", [(64, 32), (72, 13), (577, 40)], ids=lambda v: str(v))
def test_sqnr_against_float(bits, k, n):
    lin = gaussian_linear(k, n)
    q = PoTLinear.from_float(lin, bits, 64)
    x = torch.randn(16, k)
    assert sqnr(lin(x), q(x)) > MIN_SQNR[bits]


def test_more_bits_more_accuracy():
    lin = gaussian_linear(256, 64)
    x = torch.randn(32, 256)
    s = [sqnr(lin(x), PoTLinear.from_float(lin, b, 64)(x)) for b in (2, 3, 4)]
    assert s[0] < s[1] < s[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_op_equals_dequantize_then_linear(bits, dtype):
    lin = gaussian_linear(100, 24)
    q = PoTLinear.from_float(lin, bits, 32, backend="reference")
    x = torch.randn(2, 5, 100, dtype=dtype)
    w = q.dequantize_weight(dtype)
    expected = torch.nn.functional.linear(x, w, q.bias.to(dtype))
    torch.testing.assert_close(q(x), expected)
    assert q(x).dtype == dtype


def test_module_holds_no_float_weight():
    q = PoTLinear.from_float(gaussian_linear(128, 64), 4, 64)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 64)
    assert q.weight_scale.dtype == torch.float16 and q.weight_scale.shape == (64, 2)


def test_conv1d_matches_linear_layout():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs, weight [40, 24]
    torch.nn.init.normal_(conv.weight, std=0.02)
    q = PoTLinear.from_float(conv, 4, 16)
    assert q.from_conv1d and (q.in_features, q.out_features) == (40, 24)
    x = torch.randn(3, 40)
    assert sqnr(conv(x), q(x)) > MIN_SQNR[4]


def test_autograd_matches_dequantized_linear():
    q = PoTLinear.from_float(gaussian_linear(70, 20), 3, 32, backend="reference")
    q.weight_scale.requires_grad_(True)
    q.bias.requires_grad_(True)
    x = torch.randn(4, 70, requires_grad=True)
    q(x).pow(2).sum().backward()
    gx, gs, gb = x.grad.clone(), q.weight_scale.grad.clone(), q.bias.grad.clone()

    from optimum_pot.format.levels import expand_groups
    from optimum_pot.library.reference import unit_weight

    x2 = x.detach().clone().requires_grad_(True)
    s2 = q.weight_scale.detach().float().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    w2 = expand_groups(s2, 32, 70) * unit_weight(q.weight, 3, 70, True)
    torch.nn.functional.linear(x2, w2, b2).pow(2).sum().backward()
    torch.testing.assert_close(gx, x2.grad)
    torch.testing.assert_close(gs.float(), s2.grad, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(gb, b2.grad)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck_reference(bias):
    q = PoTLinear.from_float(gaussian_linear(40, 16, bias=bias), 4, 16)
    x = torch.randn(3, 40)
    args = (x, q.weight, q.weight_scale, q.bias, 4, 16, 40, True, "reference")
    torch.library.opcheck(pot_linear, args)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_inference_op_opcheck_and_equal(bias):
    """``pot_linear_infer`` (no autograd, used by PoTLinear in compiled inference graphs) passes opcheck and equals
    the main op."""
    q = PoTLinear.from_float(gaussian_linear(40, 16, bias=bias), 4, 16)
    x = torch.randn(3, 40)
    b = None if q.bias is None else q.bias.detach()  # the op is used only when nothing needs a gradient
    args = (x, q.weight, q.weight_scale, b, 4, 16, 40, True, "reference")
    torch.library.opcheck(
        pot_linear_infer, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static")
    )
    torch.testing.assert_close(pot_linear_infer(*args), pot_linear(*args), rtol=0, atol=0)


def test_grad_still_flows_when_compiled():
    """Under torch.compile a layer whose input needs a gradient must use the op with autograd, not the lean one."""
    q = PoTLinear.from_float(gaussian_linear(40, 16), 4, 16)
    x = torch.randn(3, 40, requires_grad=True)
    torch.compile(q, backend="aot_eager")(x).sum().backward()
    ref = torch.randn(3, 40, requires_grad=True)
    with torch.no_grad():
        ref.copy_(x)
    q(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_meta_device_shapes():
    q = PoTLinear(72, 13, bits=3, group_size=32, device="meta")
    y = q(torch.empty(2, 7, 72, device="meta"))
    assert y.shape == (2, 7, 13) and y.device.type == "meta"


def test_torch_compile_reference():
    q = PoTLinear.from_float(gaussian_linear(64, 32), 4, 32, backend="reference")
    x = torch.randn(4, 64)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x))


def test_reference_always_available():
    assert "reference" in available_backends("cpu")
    assert "reference" in available_backends("cuda")


def test_auto_equals_reference_on_cpu():
    q = PoTLinear.from_float(gaussian_linear(96, 48), 4, 32)
    x = torch.randn(3, 96)
    ref = pot_linear_reference(x, q.weight, q.weight_scale, q.bias, 4, 32, 96, True)
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-5)


def test_quantize_plain_torch_model_honours_skips():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(5, 32)
    ref = model(x)
    from optimum_pot import PoTConfig

    quantize(model, PoTConfig(bits=4, group_size=16, modules_to_not_convert=["2"]))
    assert isinstance(model[0], PoTLinear) and isinstance(model[2], torch.nn.Linear)
    assert sqnr(ref, model(x)) > 10
