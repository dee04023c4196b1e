"""Modules: the packed ``PoTLinear`` and in-place model surgery (no transformers, hf/ or calibration/ imports)."""

from .convert import dequantize_model, linear_targets, pot_layers, set_backend  # noqa: F401
from .fuse import fuse_projections, unfuse_projections  # noqa: F401
from .pot_linear import PoTLinear  # noqa: F401
