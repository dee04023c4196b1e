"""Registers ``"pot"`` with transformers' auto-quantizer maps, once per process."""

from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

QUANT_METHOD = "pot"


def register() -> None:
    """Puts ``PoTConfig`` / ``PoTHfQuantizer`` under ``"pot"``. Idempotent.

    Replaces the lazy placeholders of ``optimum_pot_autoload`` (which import optimum_pot on first use); leaves a
    class registered by anything else (e.g. an earlier import of a reloaded module) in place.
    """
    from ..config import PoTConfig
    from .quantizer import PoTHfQuantizer

    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, PoTConfig), (AUTO_QUANTIZER_MAPPING, PoTHfQuantizer)):
        current = mapping.get(QUANT_METHOD)
        if current is None or getattr(current, "_optimum_pot_placeholder", False):
            mapping[QUANT_METHOD] = cls
