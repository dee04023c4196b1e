"""QAT: fake-quantised layers, the Trainer callback, conversion, checkpoints/resume, training a loaded PoT model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_pot import PoTConfig, PoTLinear, quantize
from optimum_pot.format.levels import fake_quantize
from optimum_pot.format.scale_search import search_scales
from optimum_pot.qat import PoTFakeQuantLinear, PoTQATCallback, convert_qat, is_qat_prepared, prepare_qat, ste

from .conftest import make_tiny_gpt2, make_tiny_llama
from .level_sets import ALL_LEVEL_SETS, ids

MAKERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (vocab 256 of the tiny models)."""

    def __init__(self, n: int = 16, seq_len: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 256, (n, seq_len), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def trainer_for(model, out, steps, callbacks=(), save_steps=None, lr=1e-3):
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr, report_to=[],
        lr_scheduler_type="constant", use_cpu=True, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, seed=0, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=RandomTokens(), callbacks=list(callbacks))


def packed_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("weight_scale", ".weight"))}


@pytest.mark.parametrize("level_set", ALL_LEVEL_SETS, ids=ids)
@pytest.mark.parametrize("shape,group_size", [((24, 96), 32), ((10, 72), 32)], ids=["whole", "partial"])
def test_chunked_ste_equals_the_generic_fake_quantize(level_set, shape, group_size, monkeypatch):
    """Same values (bit for bit) and gradients as format.levels.fake_quantize, across chunk boundaries."""
    monkeypatch.setattr(ste, "CHUNK_ELEMENTS", 96)  # several chunks even on these small weights
    torch.manual_seed(0)
    w0 = torch.randn(shape) * 0.05
    s0, z0 = search_scales(w0, level_set, group_size, 4)
    grad = torch.randn(shape)
    results = []
    for fn in (fake_quantize, ste.fake_quantize_ste):
        w, s = w0.clone().requires_grad_(), (s0 * 1.1).requires_grad_()
        z = None if z0 is None else z0.clone().requires_grad_()
        q = fn(w, s, z, group_size, level_set)
        q.backward(grad)
        results.append((q.detach(), w.grad, s.grad, None if z is None else z.grad))
    (q_a, w_a, s_a, z_a), (q_b, w_b, s_b, z_b) = results
    assert torch.equal(q_a, q_b) and torch.equal(w_a, w_b)
    torch.testing.assert_close(s_b, s_a, rtol=1e-5, atol=1e-6)
    if z_a is not None:
        torch.testing.assert_close(z_b, z_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "arch,bits,group_size",
    [("llama", 2, 16), ("gpt2", 3, 32), ("llama", 4, 64), ("gpt2", 3, 50)],
    ids=["llama-2bit-g16", "gpt2-3bit-g32", "llama-4bit-g64", "gpt2-3bit-g50-partial"],
)
def test_untrained_qat_equals_ptq(arch, bits, group_size):
    """Scales start at PoTPTQ step 1: converting without training gives the calibration-free PTQ model."""
    cfg = PoTConfig(bits=bits, group_size=group_size)
    ptq = quantize(MAKERS[arch](), cfg)
    qat = convert_qat(prepare_qat(MAKERS[arch](), cfg))
    for name, m in ptq.named_modules():
        if isinstance(m, PoTLinear):
            q = qat.get_submodule(name)
            assert torch.equal(q.weight, m.weight) and torch.equal(q.weight_scale, m.weight_scale), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fake_quant_forward_matches_packed(arch, bits):
    """What QAT trains (fake-quantised float) is what the packed model computes, after perturbing the scales."""
    model = prepare_qat(MAKERS[arch](), PoTConfig(bits=bits, group_size=32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PoTFakeQuantLinear):
                m.weight_scale.mul_(1 + 0.1 * torch.rand_like(m.weight_scale))
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        fake = model(x).logits
        convert_qat(model)
        packed = model(x).logits
    assert not is_qat_prepared(model)
    torch.testing.assert_close(packed, fake, atol=1e-4, rtol=1e-4)


def test_gradients_reach_weight_and_scale():
    model = prepare_qat(make_tiny_llama(), PoTConfig(bits=3, group_size=32))
    x = torch.randint(0, 256, (2, 12))
    model(x, labels=x).loss.backward()
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, PoTFakeQuantLinear) and layer.weight_scale.dtype == torch.float32
    assert layer.weight.grad.abs().sum() > 0 and layer.weight_scale.grad.abs().sum() > 0
    assert isinstance(model.lm_head, torch.nn.Linear)  # transformers' default skip


def test_trainer_qat_saves_packed_checkpoint_and_reloads_bit_exact(tmp_path):
    cfg = PoTConfig(bits=3, group_size=32)
    model = make_tiny_llama()
    ptq = packed_state(quantize(make_tiny_llama(), cfg))
    trainer = trainer_for(model, tmp_path / "run", 4, [PoTQATCallback(cfg)])
    assert is_qat_prepared(model)  # before the optimizer exists
    scale_ids = {id(p) for n, p in model.named_parameters() if n.endswith("weight_scale")}
    trainer.train()
    assert scale_ids <= {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert isinstance(model.model.layers[0].self_attn.q_proj, PoTLinear)
    trained = packed_state(model)
    assert any(not torch.equal(trained[k], ptq[k]) for k in ptq if k.endswith("weight_scale"))
    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    assert reloaded.config.quantization_config.quant_method == "pot"
    for k, v in packed_state(reloaded).items():
        assert torch.equal(v, trained[k]), k
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    """2 steps, checkpoint, a fresh process-like restart resumed to 4 steps == 4 straight steps, every tensor."""
    cfg = PoTConfig(bits=4, group_size=32)
    full = make_tiny_llama()
    trainer_for(full, tmp_path / "a", 4, [PoTQATCallback(cfg)]).train()
    interrupted = make_tiny_llama()
    trainer_for(interrupted, tmp_path / "b", 2, [PoTQATCallback(cfg, convert_at_end=False)], save_steps=2).train()
    resumed = make_tiny_llama()  # a fresh float model, as after a crash
    trainer = trainer_for(resumed, tmp_path / "b", 4, [PoTQATCallback(cfg)], save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.endswith("weight_scale") for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize(
    "resume_cfg,match",
    [
        (PoTConfig(bits=3, group_size=32), "levels sp2:4:offset \\(this config: sp2:3:offset\\)"),
        (PoTConfig(bits=4, group_size=16), "scale groups"),
        (PoTConfig(bits=4, group_size=32, levels="pot"), "levels sp2:4:offset .* offset=True"),
    ],
    ids=["other-bits", "other-group-size", "other-levels-no-offset"],
)
def test_resume_with_another_config_raises(tmp_path, resume_cfg, match):
    cfg = PoTConfig(bits=4, group_size=32)
    trainer_for(make_tiny_llama(), tmp_path, 1, [PoTQATCallback(cfg, convert_at_end=False)], save_steps=1).train()
    trainer = trainer_for(make_tiny_llama(), tmp_path, 2, [PoTQATCallback(resume_cfg)], save_steps=1)
    with pytest.raises(ValueError, match=f"cannot be resumed with this PoTConfig.*{match}.*same bits, levels"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_callback_on_a_packed_model_raises(tmp_path):
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="needs a float model.*Load the float checkpoint"):
        trainer_for(model, tmp_path, 1, [PoTQATCallback(PoTConfig(bits=4))])


def test_trainer_trains_a_loaded_pot_model_without_adapters(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=4, group_size=32))
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    before = packed_state(model)
    norm = model.model.norm.weight.detach().clone()
    trainer = trainer_for(model, tmp_path, 2)
    trainer.train()
    assert not torch.equal(model.model.norm.weight, norm)  # float parameters train
    after = packed_state(model)
    codes = [k for k in before if k.endswith("proj.weight")]
    assert codes and all(torch.equal(after[k], before[k]) for k in codes)  # packed codes stay frozen
    # Loading marks the float16 scales trainable: the Trainer fine-tunes them in place.
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("weight_scale"))


def test_callback_added_after_trainer_creation_raises(tmp_path):
    trainer = trainer_for(make_tiny_llama(), tmp_path, 1)
    trainer.add_callback(PoTQATCallback(PoTConfig(bits=4)))
    with pytest.raises(ValueError, match="callbacks=\\[PoTQATCallback"):
        trainer.train()


def test_prepare_qat_on_packed_model_raises():
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="needs a float model"):
        prepare_qat(model, PoTConfig(bits=4))


def test_convert_unprepared_model_raises():
    with pytest.raises(ValueError, match="prepare_qat"):
        convert_qat(make_tiny_llama(), PoTConfig(bits=4))


@pytest.mark.parametrize("arch,bits,levels", [("llama", 3, "sp2"), ("gpt2", 4, "pot"), ("llama", 2, "int")])
def test_qat_from_quantized_starts_at_that_model(arch, bits, levels):
    """from_quantized=True: step 0 is the quantised model (e.g. calibrated): same logits, same codes after convert."""
    cfg = PoTConfig(bits=bits, group_size=32, levels=levels)
    packed = quantize(MAKERS[arch](), cfg)
    with torch.no_grad():  # perturb the scales so that they are not what the search would give a float model
        for m in packed.modules():
            if isinstance(m, PoTLinear):
                m.weight_scale.mul_(1.1)
    before = packed_state(packed)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = packed(x).logits
    model = prepare_qat(packed, cfg, from_quantized=True)
    assert is_qat_prepared(model) and not any(isinstance(m, PoTLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-4, rtol=1e-4)
    model(x, labels=x).loss.backward()  # latent weights and scales train
    layer = next(m for m in model.modules() if isinstance(m, PoTFakeQuantLinear))
    assert layer.weight.grad.abs().sum() > 0 and layer.weight_scale.grad.abs().sum() > 0
    after = packed_state(convert_qat(model))
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_trainer_qat_from_a_calibrated_start(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, quantization_config=PoTConfig(bits=3, group_size=32))
    cfg = model.config.quantization_config
    prepare_qat(model, cfg, from_quantized=True)
    trainer_for(model, tmp_path, 2, [PoTQATCallback(cfg)]).train()
    assert isinstance(model.model.layers[0].mlp.down_proj, PoTLinear)
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)


def test_qat_from_quantized_refuses_mismatch_and_float():
    packed = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match="holds sp2:4.*config asks for sp2:3"):
        prepare_qat(packed, PoTConfig(bits=3, group_size=32), from_quantized=True)
    with pytest.raises(ValueError, match="needs a model with packed PoTLinear"):
        prepare_qat(make_tiny_llama(), PoTConfig(bits=4), from_quantized=True)
