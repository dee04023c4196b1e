"""QAT distillation: the KL / hidden-state losses, the forward hook through the Trainer, and bad teachers."""

import copy

import pytest
import torch
import torch.nn.functional as F

from optimum_pot import PoTConfig, PoTLinear
from optimum_pot.qat import Distiller, PoTQATCallback, check_teacher, is_qat_prepared, prepare_qat
from optimum_pot.qat.distill import hidden_loss, kl_loss

from .conftest import make_tiny_gpt2, make_tiny_llama
from .test_qat import RandomTokens, trainer_for


def test_kl_loss_matches_the_definition_and_masks_ignored_labels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 3] = -100  # position 2 predicts it: excluded
    keep = [(b, i) for b in range(2) for i in range(4) if labels[b, i + 1] != -100]
    want = sum((F.softmax(t[b, i], -1) * (F.log_softmax(t[b, i], -1) - F.log_softmax(s[b, i], -1))).sum()
               for b, i in keep)  # fmt: skip
    torch.testing.assert_close(kl_loss(s, t, labels), want / len(keep))
    torch.testing.assert_close(kl_loss(s, t, labels, num_items_in_batch=20), want / 20)
    # Temperature: T² · KL of the softened distributions.
    soft = kl_loss(s / 2, t / 2, labels) * 4
    torch.testing.assert_close(kl_loss(s, t, labels, temperature=2.0), soft)
    assert kl_loss(s, s.clone(), labels).abs() < 1e-6


def test_hidden_loss_is_zero_for_equal_states_and_positive_otherwise():
    h = tuple(torch.randn(2, 4, 8) for _ in range(3))
    assert hidden_loss(h, h) == 0
    assert hidden_loss(h, tuple(x + 0.1 for x in h)) > 0


@pytest.mark.parametrize("hidden_weight", [0.0, 1.0])
def test_float_student_of_its_own_copy_has_zero_loss(hidden_weight):
    """The hook runs the teacher on the same inputs: a float copy teaching itself has nothing to learn."""
    student = make_tiny_llama()
    Distiller(copy.deepcopy(student), hidden_weight=hidden_weight).attach(student)
    x = torch.randint(0, 256, (2, 12))
    student.train()
    assert student(input_ids=x, labels=x).loss.abs() < 1e-5
    student.eval()  # evaluation keeps the next-token loss
    assert student(input_ids=x, labels=x).loss > 1.0


def test_alpha_mixes_kl_and_next_token_loss():
    teacher, student = make_tiny_llama(seed=1), make_tiny_llama()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ce = student(input_ids=x, labels=x).loss
        kl = kl_loss(student(x).logits, teacher(x).logits, x)
    Distiller(teacher, alpha=0.25).attach(student)
    student.train()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=x, labels=x).loss, 0.25 * kl + 0.75 * ce)


def sharpened(model):
    """A teacher far from the student: final norm ×30 (much sharper logits, same vocabulary and shapes)."""
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    with torch.no_grad():
        norm.weight.mul_(30)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainer_qat_distillation_brings_the_student_closer_to_the_teacher(arch, tmp_path):
    """Through the plain Trainer: the KL to the teacher falls (next-token QAT on the same data raises it)."""
    make = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}[arch]
    teacher, model = sharpened(make()), make()
    cfg = PoTConfig(bits=2, group_size=32)
    x = RandomTokens().ids[:4]
    with torch.no_grad():
        before = kl_loss(prepare_qat(make(), cfg)(x).logits, teacher(x).logits, x)
    trainer = trainer_for(model, tmp_path, 8, [PoTQATCallback(cfg, teacher=teacher, hidden_weight=0.5)])
    trainer.train()
    layer = "transformer.h.0.mlp.c_fc" if arch == "gpt2" else "model.layers.0.mlp.up_proj"
    assert isinstance(model.get_submodule(layer), PoTLinear)
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed before conversion
    with torch.no_grad():
        after = kl_loss(model(x).logits, teacher(x).logits, x)
    assert after < 0.95 * before, (before, after)


def test_teacher_with_another_vocabulary_raises(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = make_tiny_llama().config
    cfg.vocab_size = 300
    other = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="vocabulary \\(300 logits\\) does not match the student's \\(256\\)"):
        trainer_for(make_tiny_llama(), tmp_path, 1, [PoTQATCallback(PoTConfig(bits=4), teacher=other)])


def test_teacher_with_another_architecture_raises_for_hidden_states_only(tmp_path):
    deeper = make_tiny_llama()
    deeper.model.layers.append(copy.deepcopy(deeper.model.layers[0]))
    deeper.config.num_hidden_layers = 3
    with pytest.raises(ValueError, match="Hidden-state distillation .* \\(3, 72\\) and the student \\(2, 72\\)"):
        check_teacher(deeper, make_tiny_llama(), hidden=True)
    check_teacher(deeper, make_tiny_llama(), hidden=False)  # logits only: any teacher with the same vocabulary


def test_teacher_that_is_the_student_raises(tmp_path):
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="copy.deepcopy\\(model\\)"):
        trainer_for(model, tmp_path, 1, [PoTQATCallback(PoTConfig(bits=4), teacher=model)])


def test_distillation_with_label_smoothing_raises(tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(str(tmp_path), max_steps=1, use_cpu=True, report_to=[], label_smoothing_factor=0.1)
    cb = PoTQATCallback(PoTConfig(bits=4), teacher=make_tiny_llama())
    with pytest.raises(ValueError, match="label_smoothing_factor=0"):
        Trainer(model=make_tiny_llama(), args=args, train_dataset=RandomTokens(), callbacks=[cb])


def test_bad_distillation_settings_raise():
    with pytest.raises(ValueError, match="distill_alpha=1.5"):
        PoTQATCallback(PoTConfig(bits=4), teacher=make_tiny_llama(), distill_alpha=1.5)


def test_resume_with_distillation_is_bit_exact(tmp_path):
    cfg = PoTConfig(bits=3, group_size=32)
    teacher = make_tiny_llama(seed=1)

    def callback(convert=True):
        return PoTQATCallback(cfg, convert_at_end=convert, teacher=copy.deepcopy(teacher), distill_alpha=0.5)

    full = make_tiny_llama()
    trainer_for(full, tmp_path / "a", 4, [callback()]).train()
    trainer_for(make_tiny_llama(), tmp_path / "b", 2, [callback(False)], save_steps=2).train()
    resumed = make_tiny_llama()
    trainer = trainer_for(resumed, tmp_path / "b", 4, [callback()], save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert not is_qat_prepared(resumed)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
