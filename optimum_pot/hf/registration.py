"""Registers ``"pot"`` with transformers' auto-quantizer maps, once per process."""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

QUANT_METHOD = "pot"


def register() -> None:
    """Idempotent: re-importing (e.g. reloading the module) never registers twice."""
    from ..config import PoTConfig
    from .quantizer import PoTHfQuantizer

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PoTConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(PoTHfQuantizer)
