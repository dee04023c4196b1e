"""Casting a packed model keeps its format; dequantize() and num_parameters() work on loaded, saved, pushed models."""

from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_pot import PoTConfig, PoTLinear

from .conftest import make_tiny_gpt2, make_tiny_llama

IDS = torch.tensor([[1, 9, 77, 200, 13, 255, 4, 31]])
CASTS = {
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "to-float16": lambda m: m.to(torch.float16),
    "to-dtype-kwarg": lambda m: m.to(dtype=torch.bfloat16),
    "to-device": lambda m: m.to("cpu"),
    "to-device-and-dtype": lambda m: m.to("cpu", torch.bfloat16),
    "bfloat16()": lambda m: m.bfloat16(),
}
# Level sets with and without a per-group offset (every packed tensor kind is exercised).
CONFIGS = {"pot4": dict(levels="pot", bits=4), "int3-offset": dict(levels="int", bits=3, offset=True)}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def float_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"casts-{request.param}")
    (make_tiny_llama if request.param == "llama" else make_tiny_gpt2)().save_pretrained(path)
    return str(path)


def quantized(float_dir, config_name):
    return AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=PoTConfig(group_size=32,
                                                **CONFIGS[config_name]))  # fmt: skip


def packed_state(model) -> dict[str, torch.Tensor]:
    """Every packed tensor of every PoT layer, cloned."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PoTLinear):
            for t in ("weight", "weight_scale", "weight_offset"):
                if getattr(m, t) is not None:
                    out[f"{name}.{t}"] = getattr(m, t).detach().clone()
    return out


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("cast", sorted(CASTS))
def test_cast_keeps_packed_format_and_reloads_bit_exactly(cast, config_name, float_dir, tmp_path):
    model = quantized(float_dir, config_name)
    before = packed_state(model)
    assert any(k.endswith("weight_offset") for k in before) == (config_name == "int3-offset")
    cast_model = CASTS[cast](model)
    after = packed_state(cast_model)
    assert after.keys() == before.keys()
    for key, t in after.items():
        assert t.dtype == (torch.uint8 if key.endswith(".weight") else torch.float16), (key, t.dtype)
        assert torch.equal(t, before[key]), key  # values untouched, not merely cast back
    expected = logits(cast_model)
    assert torch.isfinite(expected.float()).all()
    cast_model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    reloaded = packed_state(again)
    assert all(torch.equal(reloaded[k], before[k]) for k in before)
    assert torch.equal(logits(again.to(expected.dtype)), expected)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """The Hub upload intercepted (as in test_hub.py): returns the folder each commit's files are copied to."""
    import shutil

    sent = tmp_path / "hub"

    def create_commit(api, repo_id, operations, **kwargs):
        for op in operations:
            (sent / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(op.path_or_fileobj, sent / op.path_in_repo)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    import transformers.utils.hub as transformers_hub

    def no_card(repo_id, **kwargs):
        raise huggingface_hub.errors.EntryNotFoundError("no card")

    monkeypatch.setattr(transformers_hub.ModelCard, "load", no_card)
    return sent


def _assert_dequantizes(model, reference_weights, dtype=None):
    float_model = model.dequantize() if dtype is None else model.dequantize(dtype=dtype)
    assert not any(isinstance(m, PoTLinear) for m in float_model.modules())
    assert getattr(float_model.config, "quantization_config", None) is None
    for name, w in reference_weights.items():
        got = float_model.get_submodule(name).weight
        assert torch.equal(got.float(), w.float()), name
    assert torch.isfinite(logits(float_model).float()).all()


@pytest.mark.parametrize("route", ["loaded", "after-save", "reloaded", "after-push", "pushed-and-reloaded"])
def test_dequantize_works_on_every_model(route, float_dir, tmp_path, fake_hub):
    model = quantized(float_dir, "pot4")
    reference = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, PoTLinear)}
    reference = {n: w.t() if model.get_submodule(n).from_conv1d else w for n, w in reference.items()}
    if route in ("after-save", "reloaded"):
        model.save_pretrained(tmp_path / "saved")
    if route in ("after-push", "pushed-and-reloaded"):
        model.push_to_hub("user/tiny-pot")
    if route == "reloaded":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    if route == "pushed-and-reloaded":
        model = AutoModelForCausalLM.from_pretrained(fake_hub)
    _assert_dequantizes(model, reference)


def test_dequantize_to_a_named_dtype(float_dir, tmp_path):
    model = quantized(float_dir, "pot4")
    model.save_pretrained(tmp_path / "saved")  # turns config.dtype into a string
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    packed = [name for name, m in again.named_modules() if isinstance(m, PoTLinear)]
    float_model = again.dequantize(dtype=torch.bfloat16)
    assert packed and all(float_model.get_submodule(n).weight.dtype == torch.bfloat16 for n in packed)


@pytest.mark.parametrize("route", ["quantised-while-loading", "reloaded", "after-cast"])
def test_num_parameters_is_the_logical_count(route, float_dir, tmp_path):
    """Like bitsandbytes: a packed layer counts as the float layer it stands for."""
    float_model = AutoModelForCausalLM.from_pretrained(float_dir)
    model = quantized(float_dir, "int3-offset")
    if route == "reloaded":
        model.save_pretrained(tmp_path / "saved")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    if route == "after-cast":
        model = model.to(torch.bfloat16)
    assert model.num_parameters() == float_model.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == float_model.num_parameters(exclude_embeddings=True)
