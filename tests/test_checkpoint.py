"""Checkpoint format version 2: self-describing metadata, verified at load; version 1 still loads bit-exact."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_pot import PoTConfig, PoTLinear, set_backend
from optimum_pot.hf.checkpoint import PREFIX, VERIFY_ENV

V1 = os.path.join(os.path.dirname(__file__), "fixtures", "pot_v1_tiny_llama")
KEY = "model.layers.0.mlp.up_proj"


def test_version_1_checkpoint_loads_bit_exact():
    """A checkpoint written by optimum_pot 0.1 (format 1, pot levels, per-module bits) decodes as it did then."""
    model = AutoModelForCausalLM.from_pretrained(V1)
    set_backend(model, "reference")
    expected = load_file(os.path.join(V1, "expected_logits.safetensors"))
    with torch.no_grad():  # recorded on an Intel CPU: another CPU's float GEMMs may round the last bit differently
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PoTLinear)}
    assert layers["model.layers.0.self_attn.o_proj"].level_set.id == "pot:2"
    assert layers["model.layers.1.mlp.down_proj"].level_set.id == "pot:3"
    assert layers[KEY].level_set.id == "pot:4"


def test_saving_a_version_1_model_writes_version_2(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(V1)
    model.save_pretrained(tmp_path)
    q = json.load(open(tmp_path / "config.json"))["quantization_config"]
    assert q["format_version"] == 2 and q["levels"] == "pot"
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory, tiny_llama_path):
    out = tmp_path_factory.mktemp("v2")
    cfg = PoTConfig(bits=4, group_size=32, module_bits={"model.layers.1.mlp.down_proj": 3})
    AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=cfg).save_pretrained(out)
    return out


def test_metadata_describes_every_layer(v2_ckpt):
    with safe_open(str(v2_ckpt / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta[PREFIX + "format_version"] == "2"
    layers = json.loads(meta[PREFIX + "layers"])
    assert layers[KEY]["levels"] == "sp2:4:offset" and layers[KEY]["group_size"] == 32
    assert layers["model.layers.1.mlp.down_proj"]["levels"] == "sp2:3:offset"
    assert len(layers[KEY]["sha256"]) == 64
    tables = json.loads(meta[PREFIX + "level_sets"])
    assert tables["sp2:4:offset"] == list(PoTConfig().level_set.values)


def copy_with(src, dst, config_edit=None, tensor_edit=None, meta_edit=None):
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.load(open(dst / "config.json"))
        config_edit(cfg["quantization_config"])
        json.dump(cfg, open(dst / "config.json", "w"))
    if tensor_edit or meta_edit:
        with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
            meta = dict(f.metadata())
        sd = load_file(dst / "model.safetensors")
        if tensor_edit:
            tensor_edit(sd)
        if meta_edit:
            meta_edit(meta)
        save_file(sd, dst / "model.safetensors", metadata=meta)
    return dst


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda q: q.update(group_size=33), r"group_size=32.*config.json gives 33"),  # same group count (72 cols)
        (lambda q: q.update(levels="int"), r"levels='sp2:4:offset', config.json gives 'int:4:offset'"),
        (lambda q: q.update(levels="pot", offset=True), r"levels='sp2:4:offset', config.json gives 'pot:4:offset'"),
        (lambda q: q.update(bits=3), r"does not match its config.json"),
        (
            lambda q: q.update(modules_to_not_convert=["lm_head", "model.layers.0.mlp"]),
            r"packed in the checkpoint but config.json "
            r"keeps it in float",
        ),
    ],
    ids=["group_size", "levels", "offset", "bits", "skips"],
)
def test_config_edits_that_change_decoding_are_refused(v2_ckpt, tmp_path, edit, match):
    bad = copy_with(v2_ckpt, tmp_path / "bad", config_edit=edit)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_a_changed_level_table_is_refused(v2_ckpt, tmp_path):
    def meta_edit(meta):
        tables = json.loads(meta[PREFIX + "level_sets"])
        tables["sp2:4:offset"][0] = -7.0
        meta[PREFIX + "level_sets"] = json.dumps(tables)

    bad = copy_with(v2_ckpt, tmp_path / "bad", meta_edit=meta_edit)
    with pytest.raises(ValueError, match=r"stores the table .*upgrade optimum_pot"):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5], ids=["nan", "inf", "negative"])
def test_bad_scales_are_refused_at_load(v2_ckpt, tmp_path, value):
    def tensor_edit(sd):
        sd[f"{KEY}.weight_scale"][0, 0] = value

    bad = copy_with(v2_ckpt, tmp_path / "bad", tensor_edit=tensor_edit)
    with pytest.raises(ValueError, match=r"NaN, Inf or negative scales"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_flipped_code_bytes_are_caught_by_the_digest(v2_ckpt, tmp_path, monkeypatch):
    def tensor_edit(sd):
        sd[f"{KEY}.weight"][3, 5] ^= 0x10

    bad = copy_with(v2_ckpt, tmp_path / "bad", tensor_edit=tensor_edit)
    AutoModelForCausalLM.from_pretrained(bad)  # undetectable without the check (loads)
    monkeypatch.setenv(VERIFY_ENV, "1")
    with pytest.raises(ValueError, match=rf"integrity check failed for \['{KEY}'\]"):
        AutoModelForCausalLM.from_pretrained(bad)
    AutoModelForCausalLM.from_pretrained(v2_ckpt)  # the intact checkpoint passes


def test_info_verify_checks_digests_without_loading(v2_ckpt, tmp_path, capsys):
    from optimum_pot.cli.main import main

    assert main(["info", str(v2_ckpt), "--verify"]) == 0
    assert "layers match their SHA-256 digests" in capsys.readouterr().out

    def tensor_edit(sd):
        sd[f"{KEY}.weight"][3, 5] ^= 0x10

    bad = copy_with(v2_ckpt, tmp_path / "bad", tensor_edit=tensor_edit)
    assert main(["info", str(bad), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "integrity: FAILED for 1 of" in out and KEY in out


def test_wrong_tensor_shape_names_the_setting(v2_ckpt, tmp_path):
    def tensor_edit(sd):
        sd[f"{KEY}.weight_scale"] = sd[f"{KEY}.weight_scale"][:, :1].contiguous()

    bad = copy_with(v2_ckpt, tmp_path / "bad", tensor_edit=tensor_edit)
    with pytest.raises(ValueError, match=rf"{KEY}.weight_scale is F16 \[200, 1\], config.json .* needs"):
        AutoModelForCausalLM.from_pretrained(bad)
