"""optimum_pot: power-of-two (PoT) weight quantisation for transformers.

``import optimum_pot`` registers the ``"pot"`` quantisation method with transformers (once).
"""

from . import kernels  # noqa: F401, I001  (registers the kernels with the op; nothing compiles at import)
from .config import FORMAT_VERSION, PoTConfig
from .format.level_set import LevelSet
from .format.registry import Family, families, get_level_set, register_family
from .hf.model_card import record_eval
from .hf.registration import register
from .nn import PoTLinear, dequantize_model, fuse_projections, set_backend, unfuse_projections
from .peft import register_lazily as _register_peft_lazily
from .qat import convert_qat, prepare_qat, qat_optimizer
from .api import int8_lm_head, quantize

__version__ = "0.1.0"

register()
_register_peft_lazily()  # LoRA on PoTLinear, once peft is imported (never imports peft itself)

__all__ = [
    "FORMAT_VERSION",
    "Family",
    "LevelSet",
    "PoTConfig",
    "PoTLinear",
    "PoTQATCallback",
    "PoTQuantizer",
    "convert_qat",
    "dequantize_model",
    "families",
    "fuse_projections",
    "get_level_set",
    "int8_lm_head",
    "prepare_qat",
    "qat_optimizer",
    "quantize",
    "record_eval",
    "register_family",
    "set_backend",
    "unfuse_projections",
    "__version__",
]


def __getattr__(name):
    # PoTQATCallback imports transformers' trainer stack (and peft): only when asked for.
    if name == "PoTQATCallback":
        from .qat import PoTQATCallback

        return PoTQATCallback
    if name == "PoTQuantizer":  # optimum is only needed for its OptimumQuantizer interface
        from .optimum_quantizer import PoTQuantizer

        return PoTQuantizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
