"""optimum_pot: power-of-two (PoT) weight quantisation for transformers.

``import optimum_pot`` registers the ``"pot"`` quantisation method with transformers (once).
"""

from .config import FORMAT_VERSION, PoTConfig
from .hf.registration import register
from .nn import PoTLinear, dequantize_model, quantize

__version__ = "0.1.0"

register()

__all__ = ["FORMAT_VERSION", "PoTConfig", "PoTLinear", "dequantize_model", "quantize", "__version__"]
