"""Teaches peft's LoRA about ``PoTLinear`` without importing peft when ``optimum_pot`` is imported.

peft picks a LoRA layer class per target module through a fixed list of dispatchers built inside
``LoraModel._create_new_module``; its public hook (``LoraConfig._register_custom_module``) is per config object, so
``get_peft_model(model, LoraConfig(...))`` would not find PoT layers. ``register()`` wraps ``_create_new_module`` so
PoT targets get :class:`~optimum_pot.peft.lora.PoTLoraLinear` first, every other layer is left to peft.
``register_lazily()`` (called by ``import optimum_pot``) runs ``register()`` now if peft is loaded, otherwise right
after peft's LoRA model module is first imported: peft (and its heavy imports) stay optional and lazy.
"""

import importlib.abc
import importlib.util
import sys

_TARGET = "peft.tuners.lora.model"


def register() -> None:
    """Makes ``get_peft_model`` / ``LoraModel`` wrap ``PoTLinear`` targets in ``PoTLoraLinear`` (idempotent)."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._create_new_module
    if getattr(original, "_pot_patched", False):
        return

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        from .lora import dispatch_pot

        new = dispatch_pot(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    _create_new_module._pot_patched = True
    LoraModel._create_new_module = staticmethod(_create_new_module)


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: lets the normal machinery load ``peft.tuners.lora.model``, then calls :func:`register`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


def register_lazily() -> None:
    """Registers now if peft's LoRA is already imported, else on its first import (no peft import here)."""
    if _TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
