"""The int8 serving copy of the float lm_head: accuracy, when it is used, ties, saving, config route, errors."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_pot import PoTConfig, dequantize_model, int8_lm_head
from optimum_pot.nn.int8_head import MAX_INT8_ROWS, Int8HeadLinear, quantize_rows_int8


def _head(out=300, k=72, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, out, bias=bias).eval()


def test_row_quantisation_error_is_within_half_a_step():
    w = torch.randn(50, 72) * torch.logspace(-3, 1, 50)[:, None]  # rows of very different magnitude
    w[3] = 0
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (q.float() * s.float()[:, None] - w).abs()
    assert (err <= s.float()[:, None] / 2 + 1e-6).all()
    assert s[3] == 1 and (q[3] == 0).all()


def test_nan_weight_raises_naming_the_fix():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_rows_int8(w)


@pytest.mark.parametrize("k", [72, 100, 64])  # torch's int8 matmul needs K % 16 == 0: the copy is padded
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1,), (2, 3), (MAX_INT8_ROWS,)])
def test_decode_sized_inputs_use_int8_and_stay_close(shape, bias, k):
    shape = (*shape, k)
    lin = _head(k=k, bias=bias)
    head = Int8HeadLinear.from_linear(lin)
    x = torch.randn(shape)
    with torch.no_grad():
        ref, out = lin(x), head(x)
        deq = F.linear(x.bfloat16().float(), head.qweight[:, :k].float() * head.qscale.float()[:, None], lin.bias)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.equal(out, ref)  # the int8 path ran
    torch.testing.assert_close(out, deq, atol=2e-2, rtol=2e-2)  # what the int8 path computes, up to bf16 sums
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
    assert sqnr > 30


def test_prefill_training_and_grad_use_the_exact_float_weight():
    lin = _head()
    head = Int8HeadLinear.from_linear(lin)
    with torch.no_grad():
        x = torch.randn(MAX_INT8_ROWS + 1, 72)
        assert torch.equal(head(x), lin(x))
    x = torch.randn(1, 72)
    assert torch.equal(head(x), lin(x))  # grad enabled and weight.requires_grad: float path
    head(x).sum().backward()
    assert lin.weight.grad is not None  # same Parameter
    head.train()
    with torch.no_grad():
        assert torch.equal(head(x), lin(x))


def test_shares_parameters_and_tracks_in_place_edits():
    lin = _head()
    head = Int8HeadLinear.from_linear(lin)
    assert head.weight is lin.weight and "qweight" not in head.state_dict()
    x = torch.randn(1, 72)
    with torch.no_grad():
        before = head(x)
        lin.weight.mul_(2)  # an in-place edit of the shared weight
        after = head(x)
    torch.testing.assert_close(after, 2 * before, atol=0.05, rtol=0.02)
    with torch.no_grad():
        head.weight = nn.Parameter(torch.zeros_like(lin.weight))  # re-tied to another tensor
        assert head(x).abs().max() == 0


def test_refuses_a_non_linear_head():
    with pytest.raises(ValueError, match="float nn.Linear"):
        Int8HeadLinear.from_linear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="no module"):
        int8_lm_head(nn.Sequential(nn.Linear(2, 2)), name="lm_head")


def test_tied_gpt2_keeps_tie_state_dict_and_logits(tiny_gpt2_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path).eval()
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        ref = model(ids).logits
    keys = set(model.state_dict())
    int8_lm_head(model)
    assert isinstance(model.lm_head, Int8HeadLinear)
    assert model.lm_head.weight is model.transformer.wte.weight and set(model.state_dict()) == keys
    with torch.no_grad():
        out = model(ids[:, :1]).logits
    torch.testing.assert_close(out, ref[:, :1], atol=0.05, rtol=0.05)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ref)


def test_config_route_saves_the_float_head_and_reloads_int8(tiny_llama_path, tmp_path):
    cfg = PoTConfig(bits=4, group_size=32, lm_head="int8")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=4, group_size=32))
    assert isinstance(model.lm_head, Int8HeadLinear) and type(plain.lm_head) is nn.Linear
    ids = torch.tensor([[3, 7, 11]])
    with torch.no_grad():
        a, b = model(ids[:, :1]).logits, plain.eval()(ids[:, :1]).logits
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again.lm_head, Int8HeadLinear) and again.config.quantization_config.lm_head == "int8"
    with torch.no_grad():
        assert torch.equal(again(ids[:, :1]).logits, model(ids[:, :1]).logits)
    dequantize_model(again)
    assert type(again.lm_head) is nn.Linear


def test_packed_head_warns_and_bad_value_raises(tiny_llama_path):
    with pytest.raises(ValueError, match="lm_head must be one of"):
        PoTConfig(lm_head="int4")
    cfg = PoTConfig(bits=4, group_size=32, modules_to_not_convert=[], lm_head="int8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg)
    assert any("no effect" in str(w.message) for w in caught)


def test_exports_with_the_int8_matmul():
    head = Int8HeadLinear.from_linear(_head())
    x = torch.randn(1, 72)
    with torch.no_grad():
        ep = torch.export.export(head, (x,))
        assert "_weight_int8pack_mm" in str(ep.graph)
        torch.testing.assert_close(ep.module()(x), head(x))
