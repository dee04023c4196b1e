"""``PoTQATCallback``: quantisation-aware training of a float model with the transformers ``Trainer``."""

from transformers import TrainerCallback

from .distill import Distiller
from .fake_quant import convert_qat, is_qat_prepared, prepare_qat


class PoTQATCallback(TrainerCallback):
    """Trains a float model through PoT fake quantisation and leaves a packed ``"pot"`` model at the end.

    The fake-quantisers go in when the ``Trainer`` is created (``on_init_end``), i.e. before the optimizer, DDP
    wrapping and ``resume_from_checkpoint`` loading, which all happen before ``on_train_begin``: the learnable
    scales are then optimised, synchronised across processes, and saved/restored by checkpoints like any other
    parameter. Checkpoints written during training hold the float weights and float32 ``weight_scale`` tensors; a
    new ``Trainer`` built with this callback on the same float model resumes them with ``resume_from_checkpoint``.
    At ``on_train_end`` the model becomes packed ``PoTLinear`` layers (learned scales), so ``trainer.save_model()``,
    ``save_pretrained`` and ``push_to_hub`` write a packed checkpoint.

    With a ``teacher`` (the float model, a separate frozen copy), training distils it: the model's training loss
    becomes ``alpha · T² · KL(teacher ‖ student)`` on the logits, plus ``(1 − alpha)`` times the next-token loss, plus
    ``hidden_weight`` times a per-block hidden-state loss (``optimum_pot/qat/distill.py``; a forward hook, so the
    plain ``Trainer`` does it). Evaluation keeps the next-token loss. The teacher costs one more forward pass per
    step and its own memory (a float copy of the model).

    The scales share the ``Trainer``'s learning rate unless the optimizer is built with
    :func:`~optimum_pot.qat_optimizer` (after ``prepare_qat``) and passed as ``Trainer(optimizers=(optimizer, None))``;
    that, on a calibrated model prepared with ``from_quantized=True, train_weights=False``, is the best measured
    route at 3 bits and below (docs/training.md).

    Args:
        config (`PoTConfig`): bits, level set, group size and excluded modules of the target format.
        convert_at_end (`bool`, *optional*, defaults to `True`): pack the model when training ends. Set `False`
            to keep training later (e.g. several ``train()`` calls) and call ``convert_qat(model)`` yourself.
        teacher (`torch.nn.Module`, *optional*): a frozen float teacher with the student's vocabulary.
        distill_alpha (`float`, *optional*, defaults to 1.0): weight of the KL term (``1 - alpha``: next-token loss).
        temperature (`float`, *optional*, defaults to 1.0): softmax temperature of the KL.
        hidden_weight (`float`, *optional*, defaults to 0.0): weight of the hidden-state loss (needs the same number
            of blocks and hidden size as the student).

    Example:

    ```python
    teacher = copy.deepcopy(float_model)
    trainer = Trainer(model=float_model, args=args, train_dataset=ds,
                      callbacks=[PoTQATCallback(PoTConfig(bits=3), teacher=teacher)])
    trainer.train()
    trainer.save_model("out")  # a packed "pot" checkpoint
    ```
    """

    def __init__(
        self,
        config,
        convert_at_end: bool = True,
        teacher=None,
        distill_alpha: float = 1.0,
        temperature: float = 1.0,
        hidden_weight: float = 0.0,
    ):
        self.config = config
        self.convert_at_end = convert_at_end
        self.distiller = None if teacher is None else Distiller(teacher, distill_alpha, temperature, hidden_weight)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if not is_qat_prepared(model):
            prepare_qat(model, self.config)
        if self.distiller is not None:
            if getattr(args, "label_smoothing_factor", 0):
                raise ValueError(
                    "QAT distillation replaces the model's loss, but label_smoothing_factor takes the labels away "
                    "from the model. Set label_smoothing_factor=0 (or soften the teacher with temperature)."
                )
            self.distiller.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not is_qat_prepared(model):
            raise ValueError(
                "PoTQATCallback found no fake-quantised layers at train start: it was added after the Trainer was "
                "created (trainer.add_callback), when the optimizer no longer sees new parameters, or the model was "
                "already converted by an earlier train(). Pass it as Trainer(..., callbacks=[PoTQATCallback(config)]) "
                "on the float model (use convert_at_end=False to call train() several times), or call "
                "optimum_pot.prepare_qat(model, config) before creating the Trainer."
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.convert_at_end and model is not None and is_qat_prepared(model):
            if self.distiller is not None:
                self.distiller.detach()
            convert_qat(model, self.config)
