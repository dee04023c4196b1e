"""Every error a user can cause: a clear message naming the fix, nothing silently wrong."""

import json
import logging
import shutil

import pytest
import torch
from .conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_pot
from optimum_pot import PoTConfig
from optimum_pot.nn import PoTLinear


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
    with pytest.raises(ValueError, match=rf"missing tensor {KEY}\.{tensor}"):
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
    with pytest.raises(ValueError, match=rf"{KEY}\.{tensor} is torch\.\w+ .* expected"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_wrong_shape_is_an_error(packed_ckpt, tmp_path):
    def edit_tensors(sd):
        sd[f"{KEY}.weight"] = sd[f"{KEY}.weight"][:, :10].contiguous()

    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_tensors=edit_tensors)
    with pytest.raises((RuntimeError, ValueError), match="ignore_mismatched_sizes|does not match"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_bits_mismatch_with_config_is_an_error(packed_ckpt, tmp_path):
    bad = corrupt(packed_ckpt, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(bits=3))
    with pytest.raises((RuntimeError, ValueError)):
        AutoModelForCausalLM.from_pretrained(bad)


def test_unknown_format_version(packed_ckpt, tmp_path):
    bad = corrupt(
        packed_ckpt, tmp_path / "bad", edit_config=lambda c: c["quantization_config"].update(format_version=99)
    )
    with pytest.raises(ValueError, match=r"format version 99.*versions \[1\]"):
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
    q = PoTLinear.from_float(torch.nn.Linear(16, 8), 4, 16, backend="triton")
    from optimum_pot.library import ops

    if ops._KERNELS.get(("cpu", "triton"), (None, lambda: False))[1]():
        pytest.skip("a Triton CPU interpreter backend is available here")
    with pytest.raises(
        RuntimeError, match=r"backend 'triton' is not available for cpu tensors; available there.*TRITON_INTERPRET=1"
    ):
        q(torch.randn(2, 16))
