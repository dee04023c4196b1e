"""transformers integration on tiny Llama and GPT-2: quantise on load, save, reload bit-exact, dequantize."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_pot
from optimum_pot import PoTConfig, PoTLinear

from .conftest import make_tiny_gpt2, make_tiny_llama

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def pot_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PoTLinear)}


LEVELS = [(levels, bits) for levels in ("sp2", "pot", "int") for bits in (2, 3, 4)]


@pytest.mark.parametrize("levels,bits", LEVELS, ids=lambda v: str(v))
def test_quantize_on_load_save_reload_bit_exact(tiny_model_path, tmp_path, levels, bits):
    pot = PoTConfig(bits=bits, group_size=32, levels=levels)
    q = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=pot)
    assert len(pot_modules(q)) > 0 and all(m.level_set == pot.level_set for m in pot_modules(q).values())
    q.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert cfg["quant_method"] == "pot" and cfg["bits"] == bits and cfg["format_version"] == 2
    assert cfg["levels"] == levels
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".pt", ".pkl"))]  # no pickle
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(pot_modules(again)) == set(pot_modules(q))
    for (k, a), (k2, b) in zip(q.state_dict().items(), again.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    assert torch.equal(logits(q), logits(again))


def test_quantized_output_close_to_float(tiny_model_path):
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    q = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=PoTConfig(bits=4, group_size=32))
    a, b = logits(ref), logits(q)
    assert 10 * torch.log10(a.pow(2).mean() / (a - b).pow(2).mean()) > 10


def test_lm_head_and_tied_embeddings_stay_float(tiny_llama_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig())
    assert isinstance(q.lm_head, torch.nn.Linear)
    assert "lm_head" in q.config.quantization_config.modules_to_not_convert


def test_gpt2_conv1d_is_quantized(tiny_gpt2_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path, quantization_config=PoTConfig(bits=4, group_size=32))
    attn = q.transformer.h[0].attn.c_attn
    assert isinstance(attn, PoTLinear) and attn.from_conv1d and (attn.in_features, attn.out_features) == (64, 192)


def test_dequantize_restores_float_layers(tiny_model_path, tmp_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_model_path, quantization_config=PoTConfig(bits=3, group_size=32))
    expected = logits(q)
    q.save_pretrained(tmp_path)
    f = AutoModelForCausalLM.from_pretrained(tmp_path).dequantize()
    assert not pot_modules(f) and not getattr(f.config, "quantization_config", None)
    torch.testing.assert_close(logits(f), expected, rtol=1e-4, atol=1e-4)


def test_quantize_outside_from_pretrained_is_saveable(tmp_path):
    model = make_tiny_llama()
    optimum_pot.quantize(model, PoTConfig(bits=3, group_size=64))
    assert isinstance(model.lm_head, torch.nn.Linear)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(model), logits(again))


def test_module_bits_override(tmp_path):
    model = make_tiny_gpt2()
    cfg = PoTConfig(bits=4, group_size=32, module_bits={"transformer.h.0.mlp.c_fc": 2})
    optimum_pot.quantize(model, cfg)
    assert model.transformer.h[0].mlp.c_fc.bits == 2 and model.transformer.h[1].mlp.c_fc.bits == 4
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.transformer.h[0].mlp.c_fc.bits == 2
    assert torch.equal(logits(model), logits(again))


def test_group_size_not_dividing_hidden(tiny_llama_path):
    # hidden 72, intermediate 200: group 128 leaves partial groups in every layer
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(group_size=128))
    down = q.model.layers[0].mlp.down_proj
    assert down.weight_scale.shape == (72, 2)
    assert torch.isfinite(logits(q)).all()


def test_bf16_model(tiny_llama_path):
    q = AutoModelForCausalLM.from_pretrained(
        tiny_llama_path, quantization_config=PoTConfig(bits=4, group_size=32), dtype=torch.bfloat16
    )
    out = logits(q)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_generate_runs(tiny_llama_path):
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=4, group_size=32))
    out = q.generate(IDS[:1, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("how", ["quantize", "from_pretrained"])
def test_quantized_tied_lm_head_round_trips(tmp_path, how):
    """``modules_to_not_convert=[]`` also packs a tied lm_head (the fast-decode recipe); the float embedding stays
    and both reload bit-exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)  # fmt: skip
    float_model = LlamaForCausalLM(cfg).eval()
    pot = PoTConfig(bits=4, group_size=64, grid_points=1, modules_to_not_convert=[], backend="cpu_int8")
    if how == "quantize":
        model = optimum_pot.quantize(float_model, pot)
    else:
        float_model.save_pretrained(tmp_path / "float")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=pot).eval()
    assert isinstance(model.lm_head, PoTLinear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    ids = torch.randint(0, 256, (1, 9))
    model.save_pretrained(tmp_path / "pot")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pot").eval()
    assert isinstance(again.lm_head, PoTLinear) and again.lm_head.backend == "cpu_int8"
    torch.testing.assert_close(again.model.embed_tokens.weight, model.model.embed_tokens.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
