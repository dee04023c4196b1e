"""Modules: the packed ``PoTLinear`` and the in-place model conversion."""

from .pot_linear import PoTLinear  # noqa: F401
from .quantize import dequantize_model, quantize, replace_with_pot_linear, set_backend  # noqa: F401
