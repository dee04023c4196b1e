"""LoRA (peft) on packed PoT models: dispatch, training with the Trainer, merge (re-quantised) and reload."""

import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_pot import PoTConfig, PoTLinear
from optimum_pot.peft import PoTLoraLinear, merge_and_requantize, merge_errors

from .conftest import WIKITEXT_VALID, byte_tokenizer

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def load(path, bits=4):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=PoTConfig(bits=bits, group_size=32))


def arch_of(model):
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def lora(model, r=4, **kw):
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[arch_of(model)], **kw))


def randomise_adapters(model, std=0.05):
    """LoRA B starts at zero (a no-op adapter); make it do something for merge tests."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)


class Repeated(torch.utils.data.Dataset):
    def __init__(self, n=8, seq_len=16):
        self.ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0)).repeat(n, 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def test_get_peft_model_wraps_pot_layers(tiny_model_path):
    model = load(tiny_model_path)
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        base_logits = model(x).logits
    peft_model = lora(model)
    wrapped = [m for m in peft_model.modules() if isinstance(m, PoTLoraLinear)]
    assert wrapped and all(isinstance(m.get_base_layer(), PoTLinear) for m in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, base_logits)  # B = 0 at init


def test_trainer_lora_on_packed_base_lowers_loss(tiny_llama_path, tmp_path):
    peft_model = lora(load(tiny_llama_path, bits=3))
    packed = {n: p.clone() for n, p in peft_model.named_parameters() if n.endswith("base_layer.weight")}
    ds = Repeated()
    batch = ds.ids[:1]
    with torch.no_grad():
        before = peft_model(input_ids=batch, labels=batch).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=peft_model, args=args, train_dataset=ds).train()
    with torch.no_grad():
        after = peft_model(input_ids=batch, labels=batch).loss.item()
    assert after < before
    assert all(torch.equal(p, packed[n]) for n, p in peft_model.named_parameters() if n in packed)


def test_merge_and_unload_stays_packed_saves_and_reloads_bit_exact(tiny_model_path, tmp_path):
    peft_model = lora(load(tiny_model_path))
    randomise_adapters(peft_model)
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        adapted = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, PoTLoraLinear) for m in merged.modules())
    errors = merge_errors(merged)
    assert len(errors) > 0 and all(0 < e < 0.5 for e in errors.values())
    with torch.no_grad():
        out = merged(x).logits
    # Re-quantisation is lossy: close to the adapted model, not equal.
    assert (out - adapted).norm() / adapted.norm() < 0.5
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, m in merged.named_modules():
        if isinstance(m, PoTLinear):
            r = reloaded.get_submodule(name)
            assert torch.equal(r.weight, m.weight) and torch.equal(r.weight_scale, m.weight_scale), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, out, atol=0, rtol=0)


def test_unmerge_restores_the_exact_base(tiny_llama_path):
    peft_model = lora(load(tiny_llama_path))
    randomise_adapters(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PoTLoraLinear)
    w, s = layer.base_layer.weight.clone(), layer.base_layer.weight_scale.clone()
    layer.merge()
    assert layer.merged and not torch.equal(layer.base_layer.weight, w)
    assert layer.base_layer.merge_error > 0
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, w) and torch.equal(layer.base_layer.weight_scale, s)


def test_dora_on_packed_base_raises(tiny_llama_path):
    with pytest.raises(ValueError, match="supports plain LoRA only"):
        lora(load(tiny_llama_path), use_dora=True)


def test_import_optimum_pot_does_not_import_peft_but_registers_on_peft_import():
    code = (
        "import sys, optimum_pot; assert 'peft' not in sys.modules, 'peft imported eagerly'; "
        "from peft.tuners.lora.model import LoraModel; assert LoraModel._create_new_module._pot_patched"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def text_windows(tok, n, seq_len, skip_chars=0):
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        text = f.read()[skip_chars : skip_chars + 20_000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    return text, ids[: n * seq_len].reshape(n, seq_len)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_requantize_keeps_the_adapters_output(arch, tiny_llama_path, tiny_gpt2_path, tmp_path):
    """Error feedback on a little text: the merged packed model is closer to the adapters than nearest rounding."""
    path = tiny_llama_path if arch == "llama" else tiny_gpt2_path
    tok = byte_tokenizer()
    text, _ = text_windows(tok, 1, 8)
    _, held_out = text_windows(tok, 4, 32, skip_chars=50_000)  # evaluation text the calibration never sees

    def adapted():  # the same adapters each call
        torch.manual_seed(0)
        model = lora(load(path, bits=3))
        randomise_adapters(model, std=0.01)
        return model

    nearest, requant = adapted(), adapted()
    with torch.no_grad():
        want = nearest(held_out).logits
        merged_nearest = nearest.merge_and_unload()
        err_nearest = (merged_nearest(held_out).logits - want).norm() / want.norm()
    merged = merge_and_requantize(requant, [text], tok, num_samples=32, seq_len=64, progress=False)
    assert not any(isinstance(m, PoTLoraLinear) for m in merged.modules())
    with torch.no_grad():
        out = merged(held_out).logits
    err = (out - want).norm() / want.norm()
    assert err < 0.9 * err_nearest, (err, err_nearest)  # measured 0.57x (llama), 0.86x (gpt2)
    errors = merge_errors(merged)
    assert set(errors) == set(merge_errors(merged_nearest)) and all(0 < e < 0.5 for e in errors.values())
    assert not any(hasattr(m, "_float_weight") for m in merged.modules())
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out).logits, out, atol=0, rtol=0)


def test_merge_and_requantize_without_adapters_raises(tiny_llama_path):
    model = lora(load(tiny_llama_path))
    model.merge_adapter()
    with pytest.raises(ValueError, match="no active, unmerged LoRA adapter"):
        merge_and_requantize(model, ["some text"], byte_tokenizer())
