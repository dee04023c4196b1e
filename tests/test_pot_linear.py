"""PoTLinear and the reference ``optimum_pot::pot_linear`` op: accuracy, autograd, fake tensors."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from optimum_pot import get_level_set, quantize
from optimum_pot.library.ops import available_backends
from optimum_pot.library.reference import pot_linear_reference
from optimum_pot.nn import PoTLinear

POT4, SP2_4 = get_level_set("pot", 4), get_level_set("sp2", 4)

# Minimum SQNR (dB) of the layer output on Gaussian weights, calibration-free, group 64.
MIN_SQNR = {2: 7.0, 3: 12.0, 4: 14.0}


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - approx).pow(2).mean())).item()


def gaussian_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin


def test_more_bits_more_accuracy():
    lin = gaussian_linear(256, 64)
    x = torch.randn(32, 256)
    for family in ("pot", "sp2", "int"):
        s = [sqnr(lin(x), PoTLinear.from_float(lin, get_level_set(family, b), 64)(x)) for b in (2, 3, 4)]
        assert s[0] < s[1] < s[2]
    s = [sqnr(lin(x), PoTLinear.from_float(lin, get_level_set("pot", b), 64)(x)) for b in (2, 3, 4)]
    assert s[0] < s[1] < s[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ls", [POT4, SP2_4], ids=str)
def test_op_equals_dequantize_then_linear(ls, dtype):
    lin = gaussian_linear(100, 24)
    q = PoTLinear.from_float(lin, ls, 32, backend="reference")
    x = torch.randn(2, 5, 100, dtype=dtype)
    w = q.dequantize_weight(dtype)
    expected = torch.nn.functional.linear(x, w, q.bias.to(dtype))
    torch.testing.assert_close(q(x), expected)
    assert q(x).dtype == dtype


def test_module_holds_no_float_weight():
    q = PoTLinear.from_float(gaussian_linear(128, 64), SP2_4, 64)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64, 64)
    assert q.weight_scale.dtype == torch.float16 and q.weight_scale.shape == (64, 2)
    assert q.weight_offset.dtype == torch.float16 and q.weight_offset.shape == (64, 2)
    assert PoTLinear.from_float(gaussian_linear(128, 64), POT4, 64).weight_offset is None


def test_group_larger_than_the_layer_is_one_group_per_row():
    q = PoTLinear.from_float(gaussian_linear(40, 8), POT4, 1 << 30)
    assert q.group_size == 40 and q.weight_scale.shape == (8, 1)


@pytest.mark.parametrize("cast", ["to_bf16", "bfloat16", "half", "float", "to_device_dtype"])
def test_dtype_casts_keep_the_format(cast):
    q = PoTLinear.from_float(gaussian_linear(64, 16), SP2_4, 32)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    q = {"to_bf16": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half(),
         "float": lambda m: m.float(), "to_device_dtype": lambda m: m.to("cpu", torch.float64)}[cast](q)  # fmt: skip
    for k, v in before.items():
        assert getattr(q, k).dtype == v.dtype and torch.equal(getattr(q, k), v), k


def test_conv1d_matches_linear_layout():
    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs, weight [40, 24]
    torch.nn.init.normal_(conv.weight, std=0.02)
    q = PoTLinear.from_float(conv, POT4, 16)
    assert q.from_conv1d and (q.in_features, q.out_features) == (40, 24)
    x = torch.randn(3, 40)
    assert sqnr(conv(x), q(x)) > MIN_SQNR[4]


@pytest.mark.parametrize("ls", [get_level_set("pot", 3), get_level_set("sp2", 3)], ids=str)
def test_autograd_matches_dequantized_linear(ls):
    q = PoTLinear.from_float(gaussian_linear(70, 20), ls, 32, backend="reference")
    params = [p for p in (q.weight_scale, q.weight_offset, q.bias) if p is not None]
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(4, 70, requires_grad=True)
    q(x).pow(2).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in params]

    from optimum_pot.format.groups import expand_groups
    from optimum_pot.format.levels import unit_values
    from optimum_pot.format.packing import unpack

    x2 = x.detach().clone().requires_grad_(True)
    s2 = q.weight_scale.detach().float().requires_grad_(True)
    z2 = None if q.weight_offset is None else q.weight_offset.detach().float().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(True)
    w2 = expand_groups(s2, 32, 70) * unit_values(unpack(q.weight, ls.bits, 70), ls)
    if z2 is not None:
        w2 = w2 + expand_groups(z2, 32, 70)
    torch.nn.functional.linear(x2, w2, b2).pow(2).sum().backward()
    expected = [x2.grad, s2.grad] + ([z2.grad] if z2 is not None else []) + [b2.grad]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=1e-3)


def test_grad_still_flows_when_compiled():
    """Under torch.compile a layer whose input needs a gradient must use the op with autograd, not the lean one."""
    q = PoTLinear.from_float(gaussian_linear(40, 16), SP2_4, 16)
    x = torch.randn(3, 40, requires_grad=True)
    torch.compile(q, backend="aot_eager")(x).sum().backward()
    ref = torch.randn(3, 40, requires_grad=True)
    with torch.no_grad():
        ref.copy_(x)
    q(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad)


def test_meta_device_shapes():
    q = PoTLinear(72, 13, level_set="sp2:3:offset", group_size=32, device="meta")
    y = q(torch.empty(2, 7, 72, device="meta"))
    assert y.shape == (2, 7, 13) and y.device.type == "meta"


def test_torch_compile_reference():
    q = PoTLinear.from_float(gaussian_linear(64, 32), SP2_4, 32, backend="reference")
    x = torch.randn(4, 64)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x))


def test_reference_always_available():
    assert "reference" in available_backends("cpu")
    assert "reference" in available_backends("cuda")


def test_auto_equals_reference_on_cpu():
    q = PoTLinear.from_float(gaussian_linear(96, 48), SP2_4, 32)
    x = torch.randn(3, 96)
    ref = pot_linear_reference(x, q.weight, q.weight_scale, q.weight_offset, q.bias, SP2_4, 32, 96)
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
    with pytest.raises(ValueError, match="already holds PoTLinear layers"):
        quantize(model, PoTConfig(bits=3))


def test_wrong_inputs_raise_like_nn_linear():
    q = PoTLinear.from_float(gaussian_linear(128, 16), SP2_4, 64)
    for bad in (torch.randn(3, 100), torch.randn(3, 200), torch.randn(128)[None, :64]):
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            q(bad)
    with pytest.raises(RuntimeError, match="floating-point inputs"):
        q(torch.ones(2, 128, dtype=torch.int64))
