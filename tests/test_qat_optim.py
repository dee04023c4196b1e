"""QAT of the quantisation parameters: ``prepare_qat(train_weights=False)`` and ``qat_optimizer``'s two rates."""

import pytest
import torch
from transformers import Trainer

from optimum_pot import PoTConfig, PoTLinear, qat_optimizer, quantize
from optimum_pot.qat import PoTFakeQuantLinear, PoTQATCallback, prepare_qat, qat_param_groups

from .conftest import make_tiny_llama
from .test_qat import RandomTokens, trainer_for


def calibrated_start(train_weights=False):
    """A packed tiny Llama prepared for QAT from its quantised weights (the recipe's starting point)."""
    packed = quantize(make_tiny_llama(), PoTConfig(bits=3, group_size=32))
    cfg = packed.config.quantization_config
    return prepare_qat(packed, cfg, from_quantized=True, train_weights=train_weights), cfg


def fq_layers(model):
    return [m for m in model.modules() if isinstance(m, PoTFakeQuantLinear)]


def test_groups_put_scales_at_their_own_rate():
    model, _ = calibrated_start()
    groups = qat_param_groups(model, lr=1e-3, scale_lr=1e-6, weight_decay=0.1)
    scales = {id(p) for m in fq_layers(model) for p in (m.weight_scale, m.weight_offset) if p is not None}
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert scales and all(by_id[s]["lr"] == 1e-6 and by_id[s]["weight_decay"] == 0.0 for s in scales)
    # train_weights=False: no latent weight is trainable, so none is in any group
    assert all(id(m.weight) not in by_id and not m.weight.requires_grad for m in fq_layers(model))
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(by_id[id(p)]["lr"] == 1e-3 and by_id[id(p)]["weight_decay"] == 0.0 for p in norms)
    default = qat_optimizer(model, lr=1e-3)  # scales at 0.3 lr unless told
    assert [g["lr"] for g in default.param_groups if id(g["params"][0]) in scales] == [pytest.approx(3e-4)]


def test_weights_trainable_by_default_and_decayed():
    model, _ = calibrated_start(train_weights=True)
    by_id = {id(p): g for g in qat_param_groups(model, 1e-3, 1e-5, 0.1) for p in g["params"]}
    assert all(by_id[id(m.weight)]["lr"] == 1e-3 and by_id[id(m.weight)]["weight_decay"] == 0.1
               for m in fq_layers(model))  # fmt: skip


def test_trainer_moves_scales_by_their_rate_and_keeps_weights(tmp_path):
    """Two rates through the real Trainer: weights fixed, scales moved by ≲ steps · scale_lr, norms by far more."""
    model, cfg = calibrated_start()
    scale_lr, steps = 1e-6, 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_for(model, tmp_path, steps, [PoTQATCallback(cfg, convert_at_end=False)], lr=1e-3)
    trainer.optimizer = qat_optimizer(model, lr=1e-3, scale_lr=scale_lr)
    trainer.train()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    scale_moves = [v for n, v in moved.items() if n.endswith(("weight_scale", "weight_offset"))]
    assert all(moved[n] == 0 for n in moved if n.endswith("proj.weight"))
    # Adam's step is at most ~(1 - β1) / sqrt(1 - β2) ≈ 3.2 learning rates
    assert 0 < max(scale_moves) <= 3.2 * steps * scale_lr
    assert max(v for n, v in moved.items() if "norm" in n) > 10 * max(scale_moves)


def test_optimizer_resume_is_bit_exact(tmp_path):
    """2 steps, checkpoint, resume to 4 with a fresh qat_optimizer == 4 straight steps (the two groups' state too)."""

    def run(out, steps, resume=None, save=None):
        model, cfg = calibrated_start()
        args = trainer_for(model, out, steps, save_steps=save).args
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                          optimizers=(qat_optimizer(model, lr=1e-3, scale_lr=1e-4), None),
                          callbacks=[PoTQATCallback(cfg, convert_at_end=False)])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return model.state_dict()

    a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2, save=2)
    b = run(tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"), save=2)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_converted_model_is_packed_at_train_end(tmp_path):
    model, cfg = calibrated_start()
    trainer = trainer_for(model, tmp_path, 1, [PoTQATCallback(cfg)])
    trainer.optimizer = qat_optimizer(model, lr=1e-3)
    trainer.train()
    assert isinstance(model.model.layers[0].mlp.down_proj, PoTLinear) and not fq_layers(model)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0, scale_lr=1e-5), "lr must be a finite number"),
    (dict(lr=1e-4, scale_lr=float("nan")), "scale_lr must be a finite number"),
    (dict(lr=1e-4, scale_lr=1e-5, weight_decay="x"), "weight_decay must be"),
])  # fmt: skip
def test_bad_rates_raise(kw, match):
    model, _ = calibrated_start()
    with pytest.raises(ValueError, match=match):
        qat_optimizer(model, **kw)


def test_unprepared_or_frozen_model_raises():
    with pytest.raises(ValueError, match="call optimum_pot.prepare_qat"):
        qat_optimizer(make_tiny_llama(), lr=1e-4)
    model, _ = calibrated_start()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        qat_optimizer(model, lr=1e-4)
