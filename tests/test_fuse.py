"""Fused projections (serving): decode results bit for bit, same checkpoints, no duplicated memory, self-healing."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_pot import PoTConfig, PoTLinear, dequantize_model, fuse_projections, quantize, unfuse_projections
from optimum_pot.format.weights import quantize_weight
from optimum_pot.nn.fuse import FusedProjections

from .conftest import make_tiny_llama


def _pair(bias=True, levels=("sp2:4:offset", "sp2:4:offset"), backend="cpu"):
    """A parent with two sibling PoTLinear layers reading the same 128-wide input."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj = PoTLinear.from_float(nn.Linear(128, 24, bias=bias), levels[0], 64, backend=backend).eval()
    parent.k_proj = PoTLinear.from_float(nn.Linear(128, 40, bias=bias), levels[1], 64, backend=backend).eval()
    parent.v_proj = PoTLinear.from_float(nn.Linear(128, 8, bias=bias), levels[1], 64, backend=backend).eval()
    return parent


def _outputs(parent, x):
    with torch.no_grad():
        return [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x)]


@pytest.mark.parametrize("backend", ["cpu", "cpu_int8", "reference"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 7, 128), (40, 128)])  # decode, small batch, GEMM path
def test_fused_outputs_equal_unfused_bit_for_bit(backend, bias, shape):
    parent = _pair(bias, backend=backend)
    x = torch.randn(shape)
    ref = _outputs(parent, x)
    assert fuse_projections(parent) == ["pot_fused_q_k_v"]
    assert isinstance(parent.pot_fused_q_k_v, FusedProjections)
    for out, want in zip(_outputs(parent, x), ref):
        if x.numel() // x.shape[-1] == 1:  # decode: our kernel computes each output row alone
            assert torch.equal(out, want)
        else:  # prefill: the BLAS may block a wider GEMM's edge columns differently (1 ulp on AMD EPYC)
            torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)
    assert parent.pot_fused_q_k_v._key is None  # every member served: the activation is not held


def test_members_share_the_stacked_storage_and_state_dict_is_unchanged():
    parent = _pair()
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    fuse_projections(parent)
    fused = parent.pot_fused_q_k_v
    for m in (parent.q_proj, parent.k_proj, parent.v_proj):  # views, not copies
        assert m.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    after = parent.state_dict()
    assert after.keys() == before.keys()  # no key of the fused module (its buffers are not persistent)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    storages = {v.untyped_storage().data_ptr() for v in after.values()}
    assert len(storages) == len(after)  # independent copies: savers never see shared storage


def test_replaced_member_weights_are_restacked():
    parent = _pair()
    fuse_projections(parent)
    x = torch.randn(1, 128)
    w = torch.randn(40, 128)
    parent.k_proj.set_quantized(*quantize_weight(w, parent.k_proj.level_set, 64))
    fresh = PoTLinear.from_float(nn.Linear(128, 40), "sp2:4:offset", 64, backend="cpu").eval()
    fresh.set_quantized(parent.k_proj.weight.data.clone(), parent.k_proj.weight_scale.data.clone(),
                        parent.k_proj.weight_offset.data.clone())  # fmt: skip
    fresh.bias.data = parent.k_proj.bias.data.clone()
    out = _outputs(parent, x)
    with torch.no_grad():
        assert torch.equal(out[1], fresh(x))


def test_in_place_edit_of_the_input_is_not_served_from_the_cache():
    parent = _pair()
    fuse_projections(parent)
    x = torch.randn(1, 128)
    with torch.no_grad():
        parent.q_proj(x)
        x.add_(1.0)  # same tensor object, new contents
        got = parent.k_proj(x)
    unfuse_projections(parent)
    with torch.no_grad():
        assert torch.equal(got, parent.k_proj(x))


def test_training_calls_run_unfused_with_gradients():
    parent = _pair()
    x = torch.randn(2, 128)
    ref = _outputs(parent, x)
    fuse_projections(parent)
    xg = x.clone().requires_grad_(True)
    y = parent.k_proj(xg)
    y.sum().backward()
    assert xg.grad is not None and torch.equal(y.detach(), ref[1])


def test_mismatched_siblings_are_not_fused_and_unfuse_restores_independent_storage():
    assert fuse_projections(_pair(levels=("sp2:4:offset", "pot:4"))) == []
    parent = _pair()
    x = torch.randn(1, 128)
    fuse_projections(parent)
    assert fuse_projections(parent) == []  # idempotent
    parent.k_proj.backend = "reference"  # settings diverged: members run alone, still correct
    got = _outputs(parent, x)
    unfuse_projections(parent)
    assert all(torch.equal(a, b) for a, b in zip(got, _outputs(parent, x)))
    assert not hasattr(parent, "pot_fused_q_k_v") and parent.q_proj._fused is None
    storages = {m.weight.untyped_storage().data_ptr() for m in (parent.q_proj, parent.k_proj, parent.v_proj)}
    assert len(storages) == 3


def test_tiny_llama_generate_save_reload_deepcopy_dequantize(tmp_path):
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=64))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    names = fuse_projections(model)
    assert len(names) == 4 and names[0] == "model.layers.0.self_attn.pot_fused_q_k_v"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), ref_tokens)
        assert torch.equal(copy.deepcopy(model)(ids).logits, ref_logits)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, ref_logits)
    dequantize_model(model)
    assert not any(isinstance(m, FusedProjections) for m in model.modules())


def test_export_traces_one_matmul_per_group(lib):
    parent = _pair(backend="cpu")
    fuse_projections(parent)

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            return self.p.q_proj(x).sum(-1) + self.p.k_proj(x).sum(-1) + self.p.v_proj(x).sum(-1)

    block = Block(parent).eval()
    x = torch.randn(1, 128)
    with torch.no_grad():
        ep = torch.export.export(block, (x,), strict=True)
        ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "optimum_pot" in str(n.target)]
        assert ops == ["optimum_pot_cpu.linear.default"]
        assert torch.equal(ep.module()(x), block(x))


def test_config_route_fuses_on_load_and_after_reload(tiny_llama_path, tmp_path):
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=4)).eval()
    cfg = PoTConfig(bits=4, fuse_projections=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg).eval()
    count = lambda m: sum(isinstance(x, FusedProjections) for x in m.modules())  # noqa: E731
    assert count(plain) == 0 and count(model) == 4
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.quantization_config.fuse_projections is True and count(reloaded) == 4
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, plain(ids).logits)


def test_config_rejects_a_non_bool_fuse_projections():
    with pytest.raises(ValueError, match="fuse_projections must be True or False"):
        PoTConfig(fuse_projections="yes")
