"""LoRA on packed PoT models with peft (QLoRA-style). peft itself is imported only when first used."""

from .registration import register, register_lazily

__all__ = ["PoTLoraLinear", "merge_and_requantize", "merge_errors", "register", "register_lazily"]


def __getattr__(name):
    # Lazy: importing these imports peft.
    if name in ("PoTLoraLinear", "merge_errors", "dispatch_pot"):
        from . import lora

        return getattr(lora, name)
    if name == "merge_and_requantize":
        from .requantize import merge_and_requantize

        return merge_and_requantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
