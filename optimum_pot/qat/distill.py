"""Knowledge distillation for QAT: the float model teaches its fake-quantised copy through the ``Trainer``.

:class:`Distiller` hooks the student's forward pass: while the student trains, every forward call also runs the
frozen teacher on the same inputs (no gradient) and replaces ``outputs["loss"]`` by

    loss = alpha · T² · KL(teacher_T ‖ student_T)  +  (1 − alpha) · next-token loss  +  hidden_weight · hidden loss

(``_T``: softmax at temperature ``T``; the hidden loss compares each decoder block's output). The ``Trainer`` reads
``outputs["loss"]`` as usual, so nothing else changes: gradient accumulation, DDP and ``resume_from_checkpoint``
work as for plain training. The KL is summed over the positions whose next-token label is not ``-100`` and divided
exactly as the model divides its own loss (by ``num_items_in_batch`` when the ``Trainer`` passes it, else by the
number of such positions), so the two terms are on the same scale.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Keyword arguments of the student's forward call that the teacher must not receive (it returns no loss).
_STUDENT_ONLY = ("labels", "num_items_in_batch", "output_hidden_states", "return_dict", "use_cache")


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0] if not getattr(head, "from_conv1d", False) else head.weight.shape[1]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _shape(model: nn.Module) -> tuple:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "num_hidden_layers", None), getattr(cfg, "hidden_size", None)


def check_teacher(teacher: nn.Module, student: nn.Module, hidden: bool) -> None:
    """Raises ``ValueError`` naming the fix when ``teacher`` cannot teach ``student``.

    The logit KL needs the same vocabulary (same output size); the hidden-state loss also needs the same number of
    decoder blocks and the same hidden size. The teacher must be a separate copy: QAT fake-quantises the student in
    place, so a teacher sharing its parameters would be fake-quantised (and trained) too.
    """
    if teacher is student or {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}:
        raise ValueError(
            "The distillation teacher shares parameters with the student being trained. Pass a frozen copy of the "
            "float model: teacher = copy.deepcopy(model) (or load it again) before creating the Trainer."
        )
    tv, sv = _vocab_size(teacher), _vocab_size(student)
    if tv is None or sv is None or tv != sv:
        raise ValueError(
            f"The distillation teacher's vocabulary ({tv} logits) does not match the student's ({sv}): KL on the "
            "logits needs the same tokenizer. Use the float checkpoint the student was loaded from as teacher."
        )
    if hidden and _shape(teacher) != _shape(student):
        raise ValueError(
            f"Hidden-state distillation compares each block's output, but the teacher has (layers, hidden size) = "
            f"{_shape(teacher)} and the student {_shape(student)}. Use the student's own float checkpoint as "
            "teacher, or distil the logits only (hidden_weight=0)."
        )


def kl_loss(student_logits, teacher_logits, labels, num_items_in_batch=None, temperature: float = 1.0):
    """``T² · Σ KL(p_teacher ‖ p_student)`` over next-token positions with a label, divided like the model's loss.

    Args:
        student_logits, teacher_logits (`torch.Tensor`): ``[B, T, V]``.
        labels (`torch.Tensor`): ``[B, T]`` (the model shifts them: position ``t`` predicts ``labels[t + 1]``).
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): the ``Trainer``'s token count over the whole
            accumulated batch; the mean over this call's positions when absent.
        temperature (`float`): softens both distributions; ``T²`` keeps the gradient scale independent of ``T``.
    """
    mask = labels[:, 1:] != -100  # [B, T-1]
    s = student_logits[:, :-1][mask].float() / temperature  # [M, V]
    t = teacher_logits[:, :-1][mask].float() / temperature  # [M, V]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    if isinstance(denom, torch.Tensor):
        denom = denom.to(kl.device)
    return kl * temperature**2 / denom


def hidden_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over decoder blocks of ``‖h_student − h_teacher‖² / ‖h_teacher‖²`` (block outputs, embeddings skipped)."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True)]  # fmt: skip
    return torch.stack(terms).mean()


class Distiller:
    """Adds a frozen teacher's distillation loss to a model's training forward passes (forward hooks).

    Args:
        teacher (`torch.nn.Module`): the float model (same vocabulary; a separate copy). Frozen and set to eval.
        alpha (`float`): weight of the KL term; ``1 - alpha`` weights the model's next-token loss.
        temperature (`float`): softmax temperature of the KL.
        hidden_weight (`float`): weight of the per-block hidden-state loss (0: logits only, no hidden states kept).
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0, hidden_weight: float = 0.0):
        for name, v, ok in (("distill_alpha", alpha, 0 <= alpha <= 1), ("temperature", temperature, temperature > 0),
                            ("hidden_weight", hidden_weight, hidden_weight >= 0)):  # fmt: skip
            if not ok:
                raise ValueError(f"{name}={v!r} is out of range: alpha in [0, 1], temperature > 0, hidden_weight >= 0.")
        self.teacher, self.alpha, self.temperature, self.hidden_weight = teacher, alpha, temperature, hidden_weight
        self.teacher.eval().requires_grad_(False)
        self._handles = []

    def attach(self, student: nn.Module) -> None:
        """Checks the teacher against ``student`` and hooks ``student``'s forward (idempotent)."""
        check_teacher(self.teacher, student, self.hidden_weight > 0)
        if not self._handles:
            self._handles = [
                student.register_forward_pre_hook(self._before, with_kwargs=True),
                student.register_forward_hook(self._after, with_kwargs=True),
            ]

    def detach(self) -> None:
        """Removes the hooks: the model computes its own loss again."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _before(self, module, args, kwargs):
        if module.training and self.hidden_weight > 0:
            kwargs = {**kwargs, "output_hidden_states": True}
        return args, kwargs

    def _after(self, module, args, kwargs, output):
        if not module.training:  # evaluation keeps the plain next-token loss (comparable with any other run)
            return None
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError(
                "QAT distillation needs the batch's labels (to know which positions count) but the model got none. "
                "Keep 'labels' in the dataset, and do not set compute_loss_func or label_smoothing_factor (they "
                "take the labels away from the model)."
            )
        teacher_kwargs = {k: v for k, v in kwargs.items() if k not in _STUDENT_ONLY}
        device = output.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            t_out = self.teacher(*args, **teacher_kwargs, output_hidden_states=self.hidden_weight > 0, use_cache=False)
        n_items = kwargs.get("num_items_in_batch")
        loss = self.alpha * kl_loss(output.logits, t_out.logits, labels, n_items, self.temperature)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * output["loss"]
        if self.hidden_weight > 0:
            h = hidden_loss(output.hidden_states, t_out.hidden_states)
            if n_items is not None:  # a per-call mean: weight it by this call's share of the accumulated tokens
                h = h * (labels[:, 1:] != -100).sum() / n_items
            loss = loss + self.hidden_weight * h
        output["loss"] = loss
        return output
