"""push_to_hub through transformers' own machinery, with the upload intercepted: the card and a bit-exact reload."""

import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

import optimum_pot
from optimum_pot import PoTConfig
from optimum_pot.hf.model_card import SECTION_END, SECTION_START, render_card

from .conftest import make_tiny_gpt2, make_tiny_llama

HAND_WRITTEN = "---\nlicense: apache-2.0\ntags:\n- mine\n---\n\n# My model\n\nHand-written notes.\n"


class FakeHub:
    """Stands in for the Hub: records the files of every commit (copied, the upload folder is temporary)."""

    def __init__(self, root, existing_card=None):
        self.root, self.existing_card, self.commits = root, existing_card, []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        dest = os.path.join(self.root, f"commit{len(self.commits)}")
        for op in operations:
            os.makedirs(os.path.dirname(os.path.join(dest, op.path_in_repo)), exist_ok=True)
            shutil.copy(op.path_or_fileobj, os.path.join(dest, op.path_in_repo))
        self.commits.append((repo_id, dest, sorted(op.path_in_repo for op in operations)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def load_card(self, repo_id, **kwargs):
        if self.existing_card is None:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return huggingface_hub.ModelCard(self.existing_card)


@pytest.fixture(params=[None, HAND_WRITTEN], ids=["new-repo", "repo-with-card"])
def hub(request, tmp_path, monkeypatch):
    fake = FakeHub(str(tmp_path / "hub"), request.param)
    # transformers calls these on its shared HfApi instance (transformers.utils.hub.hf_api()).
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda api, **kw: fake.create_commit(**kw))
    monkeypatch.setattr(transformers_hub.ModelCard, "load", lambda repo_id, **kw: fake.load_card(repo_id))
    return fake


def _quantized(kind, tmp_path, bits=4, group_size=32):
    make = make_tiny_llama if kind == "llama" else make_tiny_gpt2
    make().save_pretrained(tmp_path / "float")
    config = PoTConfig(bits=bits, group_size=group_size)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)


def _logits(model):
    ids = torch.arange(0, 256, 7).reshape(1, -1) % 256
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_push_to_hub_sends_card_and_reloadable_checkpoint(kind, hub, tmp_path):
    model = _quantized(kind, tmp_path)
    optimum_pot.record_eval(model, 42.125, "wikitext-2/test.txt", seq_len=512, windows=8)
    model.push_to_hub("tiny-pot")
    (repo_id, sent, files) = hub.commits[-1]
    assert repo_id == "user/tiny-pot"
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    with open(os.path.join(sent, "README.md"), encoding="utf-8") as f:
        card = f.read()
    for expected in ['`quant_method: "pot"`', "| bits | 4", "| group size | 32", "| level set | `sp2:4:offset`",
                     "- pot-sp2\n",
                     "| format version | 2", "42.12 on wikitext-2/test.txt (8 windows × 512 tokens)",
                     'from_pretrained("user/tiny-pot")', "- pot\n", "- 4-bit\n"]:  # fmt: skip
        assert expected in card
    assert card.count(SECTION_START) == 1
    if hub.existing_card:  # the Hub card's own metadata and text survive
        assert "license: apache-2.0" in card and "- mine\n" in card and "Hand-written notes." in card
    else:  # transformers' auto-generated text is replaced
        assert "automatically generated" not in card
    again = AutoModelForCausalLM.from_pretrained(sent)
    assert torch.equal(_logits(again), _logits(model))
    assert again.config.quantization_config.eval_perplexity == 42.125


def test_save_pretrained_writes_the_same_card_section(hub, tmp_path):
    model = _quantized("llama", tmp_path, bits=3, group_size=64)
    model.save_pretrained(tmp_path / "saved")
    model.push_to_hub("user/tiny-pot")
    with open(tmp_path / "saved" / "README.md", encoding="utf-8") as f:
        saved = f.read()
    with open(os.path.join(hub.commits[-1][1], "README.md"), encoding="utf-8") as f:
        pushed = f.read()

    def section(card):
        start, end = card.index(SECTION_START), card.index(SECTION_END)
        return card[start:end].replace(str(tmp_path / "saved"), "user/tiny-pot")

    assert section(saved) == section(pushed)
    assert "| perplexity | not evaluated |" in saved and "| bits | 3" in saved


def test_push_twice_keeps_one_section(hub, tmp_path):
    """Re-pushing to a repo whose card already has a PoT section replaces it (the Hub then serves our card)."""
    model = _quantized("llama", tmp_path)
    model.push_to_hub("user/tiny-pot")
    with open(os.path.join(hub.commits[-1][1], "README.md"), encoding="utf-8") as f:
        hub.existing_card = f.read()
    optimum_pot.record_eval(model, 10.0, "valid.txt")
    model.push_to_hub("user/tiny-pot")
    with open(os.path.join(hub.commits[-1][1], "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert card.count(SECTION_START) == 1 and "10.00 on valid.txt" in card and "not evaluated" not in card


def test_quantize_outside_from_pretrained_pushes_a_card(hub, tmp_path):
    model = optimum_pot.quantize(make_tiny_llama(), PoTConfig(bits=2, group_size=32))
    model.push_to_hub("user/tiny-pot-2bit")
    sent = hub.commits[-1][1]
    with open(os.path.join(sent, "README.md"), encoding="utf-8") as f:
        assert "| bits | 2" in f.read()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(sent)), _logits(model))


def test_dequantized_model_writes_no_pot_card(hub, tmp_path):
    model = _quantized("llama", tmp_path).dequantize()
    model.save_pretrained(tmp_path / "float_again")
    assert not os.path.exists(tmp_path / "float_again" / "README.md")


def test_record_eval_needs_a_pot_model():
    with pytest.raises(ValueError, match="PoT-quantised model"):
        optimum_pot.record_eval(make_tiny_llama(), 1.0, "x")


def test_render_card_without_existing_card_has_metadata():
    card = render_card(PoTConfig(bits=4, group_size=128), None, "org/name", base_model="org/float-model")
    assert card.startswith("---\n") and "base_model: org/float-model" in card and "library_name: transformers" in card


@pytest.mark.parametrize(
    "existing",
    [None, "# Notes only\n\nNo metadata here.\n", HAND_WRITTEN],
    ids=["no-card", "card-without-metadata", "card-with-metadata"],
)
def test_render_card_is_idempotent(existing):
    config = PoTConfig(bits=3, group_size=64)
    once = render_card(config, existing, "org/name")
    assert render_card(config, once, "org/name") == once
    assert once.count(SECTION_START) == 1 and "- 3-bit\n" in once
    if existing:
        assert existing.split("---")[-1].strip().splitlines()[-1] in once  # the hand-written text is kept


def test_save_pretrained_with_push_to_hub_sends_the_card(hub, tmp_path):
    """``save_pretrained(..., push_to_hub=True)`` is transformers' other upload path; it gets the card too."""
    model = _quantized("llama", tmp_path)
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="user/tiny-pot-3")
    repo_id, sent, files = hub.commits[-1]
    assert repo_id == "user/tiny-pot-3" and "README.md" in files
    with open(os.path.join(sent, "README.md"), encoding="utf-8") as f:
        assert 'from_pretrained("user/tiny-pot-3")' in f.read()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "local")), _logits(model))
