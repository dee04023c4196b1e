"""``PoTQATCallback``: quantisation-aware training of a float model with the transformers ``Trainer``."""

from transformers import TrainerCallback

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

    Args:
        config (`PoTConfig`): bits, group size, zero level and excluded modules of the target format.
        convert_at_end (`bool`, *optional*, defaults to `True`): pack the model when training ends. Set `False`
            to keep training later (e.g. several ``train()`` calls) and call ``convert_qat(model)`` yourself.

    Example:

    ```python
    trainer = Trainer(model=float_model, args=args, train_dataset=ds, callbacks=[PoTQATCallback(PoTConfig(bits=3))])
    trainer.train()
    trainer.save_model("out")  # a packed "pot" checkpoint
    ```
    """

    def __init__(self, config, convert_at_end: bool = True):
        self.config = config
        self.convert_at_end = convert_at_end

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not is_qat_prepared(model):
            prepare_qat(model, self.config)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not is_qat_prepared(model):
            raise ValueError(
                "PoTQATCallback found no fake-quantised layers at train start: it was added after the Trainer was "
                "created (trainer.add_callback), when the optimizer no longer sees new parameters. Pass it as "
                "Trainer(..., callbacks=[PoTQATCallback(config)]), or call optimum_pot.prepare_qat(model, config) "
                "before creating the Trainer."
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.convert_at_end and model is not None and is_qat_prepared(model):
            convert_qat(model, self.config)
