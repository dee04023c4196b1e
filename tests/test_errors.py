"""Every error a user can cause: a clear message naming the fix, nothing silently wrong."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_pot
from optimum_pot import PoTConfig
from optimum_pot.nn import PoTLinear

from .conftest import make_tiny_llama


@pytest.fixture(scope="module")
def packed_ckpt(tmp_path_factory, tiny_llama_path):
    out = tmp_path_factory.mktemp("packed")
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=4, group_size=32))
    q.save_pretrained(out)
    return out


def corrupt(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        sd = load_file(dst / "model.safetensors")
        edit_tensors(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.load(open(dst / "config.json"))
        edit_config(cfg)
        json.dump(cfg, open(dst / "config.json", "w"))
    return dst


KEY = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("tensor", ["weight", "weight_scale"])
def test_missing_tensor_names_it(packed_ckpt, tmp_path, tensor):
    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_tensors=lambda sd: sd.pop(f"{KEY}.{tensor}"))
    with pytest.raises(ValueError, match=rf"{KEY}\.{tensor} is missing"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize(
    "tensor,edit",
    [("weight_scale", lambda t: t.float()), ("weight", lambda t: t.float()), ("weight", lambda t: t.to(torch.int32))],
    ids=["scale-fp32", "weight-float", "weight-int32"],
)
def test_wrong_dtype_names_tensor(packed_ckpt, tmp_path, tensor, edit):
    def edit_tensors(sd):
        sd[f"{KEY}.{tensor}"] = edit(sd[f"{KEY}.{tensor}"])

    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_tensors=edit_tensors)
    with pytest.raises(ValueError, match=rf"{KEY}\.{tensor} is (F32|I32) .* needs torch\.(uint8|float16)"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_wrong_shape_is_an_error(packed_ckpt, tmp_path):
    def edit_tensors(sd):
        sd[f"{KEY}.weight"] = sd[f"{KEY}.weight"][:, :10].contiguous()

    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_tensors=edit_tensors)
    with pytest.raises(ValueError, match=rf"{KEY}\.weight is U8 \[200, 10\].*needs torch.uint8 \[200, 36\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_bits_mismatch_with_config_is_an_error(packed_ckpt, tmp_path):
    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(bits=3))
    with pytest.raises(ValueError, match=r"levels='sp2:4:offset', config.json gives 'sp2:3:offset'"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_unknown_format_version(packed_ckpt, tmp_path):
    bad = corrupt(
        packed_ckpt, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(format_version=99)
    )
    with pytest.raises(ValueError, match=r"format version 99.*versions \[1, 2\]"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_names_layer_in_quantize(bad):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 4] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj has 1 NaN/Inf"):
        optimum_pot.quantize(model, PoTConfig())


def test_non_finite_weight_names_layer_on_load(tmp_path):
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        # transformers collects conversion errors into its loading report, logs it, then raises.
        with pytest.raises(RuntimeError, match="conversion of the weights"):
            AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=PoTConfig())
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "model.layers.0.mlp.gate_proj has 1 NaN/Inf" in "\n".join(messages)


def test_unavailable_backend_says_which_exist(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = PoTLinear.from_float(torch.nn.Linear(16, 8), PoTConfig().level_set, 16, backend="triton")
    from optimum_pot.library import ops

    if ops._KERNELS.get(("cpu", "triton"), (None, lambda: False))[1]():
        pytest.skip("a Triton CPU interpreter backend is available here")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available for cpu tensors; available there.*TRITON_INTERPRET=1"
    ):
        q(torch.randn(2, 16))


def test_weights_beyond_float16_scales_are_refused_whatever_the_search():
    lin = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[1, 3] = 1.2e5
    for levels in ("pot", "sp2", "int"):
        for grid in (1, 16):
            with pytest.raises(ValueError, match=r"Layer big has a weight of magnitude 120000.*modules_to_not_convert"):
                PoTLinear.from_float(lin, PoTConfig(levels=levels).level_set, 32, grid_points=grid, name="big")


def test_tiny_weights_flushed_to_zero_warn():
    lin = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight.mul_(1e-12)
    with pytest.warns(RuntimeWarning, match=r"Layer tiny: 8 group\(s\) hold only weights too small"):
        PoTLinear.from_float(lin, PoTConfig(levels="pot").level_set, 32, name="tiny")


def test_unknown_module_bits_key_is_refused(tiny_llama_path):
    cfg = PoTConfig(module_bits={"model.layers.0.mlp.up_projj": 3})
    with pytest.raises(ValueError, match=r"module_bits names \['model.layers.0.mlp.up_projj'\]"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg)
    with pytest.raises(ValueError, match=r"module_bits names"):
        optimum_pot.quantize(make_tiny_llama(), cfg)


def test_config_edited_after_construction_is_checked_again(tiny_llama_path):
    cfg = PoTConfig()
    cfg.bits = 5
    with pytest.raises(ValueError, match=r"bits must be one of \[2, 3, 4\]"):
        optimum_pot.quantize(make_tiny_llama(), cfg)
    with pytest.raises(ValueError, match=r"bits must be one of"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg)


def test_pot_linear_rejects_bad_format_parameters():
    for bits in (1, 5, 4.0, True):
        with pytest.raises(ValueError, match=r"exists at bits \[2, 3, 4\]"):
            optimum_pot.get_level_set("pot", bits)
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        PoTLinear(16, 8, True, "pot:4", 0)


def test_huge_group_size_is_one_group_per_row():
    cfg = PoTConfig(group_size=1 << 40)
    model = optimum_pot.quantize(make_tiny_llama(), cfg)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.group_size == layer.in_features and layer.weight_scale.shape == (layer.out_features, 1)
