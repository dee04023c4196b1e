"""Quantisation-aware training: fake-quantised float layers, the ``Trainer`` callback (optionally distilling the
float model), conversion to packed."""

from .distill import Distiller, check_teacher
from .fake_quant import PoTFakeQuantLinear, convert_qat, is_qat_prepared, prepare_qat
from .optim import qat_optimizer, qat_param_groups

__all__ = [
    "Distiller",
    "PoTFakeQuantLinear",
    "PoTQATCallback",
    "check_teacher",
    "convert_qat",
    "is_qat_prepared",
    "prepare_qat",
    "qat_optimizer",
    "qat_param_groups",
]


def __getattr__(name):
    # Lazy: transformers' trainer modules import peft and more (seconds); only the callback needs them.
    if name == "PoTQATCallback":
        from .callback import PoTQATCallback

        return PoTQATCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
