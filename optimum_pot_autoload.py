"""Lets any Python process load a ``"pot"`` checkpoint without ``import optimum_pot`` (lm-eval, plain scripts).

How it works: the installed ``optimum_pot_autoload.pth`` imports this module when the interpreter starts (``site``
runs ``import`` lines of ``.pth`` files). It imports nothing itself (``os`` and ``sys`` are already loaded) and only
puts a finder on ``sys.meta_path`` that waits for ``transformers.quantizers.auto``. Once transformers has executed that
module, the finder adds two placeholders under ``"pot"`` to its quantisation registries and steps out of
``sys.meta_path``. The first time a ``"pot"`` config is read (``from_pretrained`` of a PoT checkpoint), a placeholder
imports ``optimum_pot``, whose ``register()`` puts the real ``PoTConfig`` and ``PoTHfQuantizer`` in their place.
So start-up costs one tiny module, and neither torch nor optimum_pot is imported before they are needed.

Turn it off with ``OPTIMUM_POT_AUTOLOAD=0``: ``"pot"`` checkpoints then load only after ``import optimum_pot``, and
loading one before that raises an ``ImportError`` saying so (instead of transformers' "Unknown quantization type").
Interpreters that skip ``.pth`` files (``python -S``, packages on ``PYTHONPATH`` or installed with ``--target``)
never run this module: there, ``import optimum_pot`` first.

This module is stdlib-only on purpose: it runs in every interpreter of the environment.
"""

import os
import sys

ENV_VAR = "OPTIMUM_POT_AUTOLOAD"
QUANT_METHOD = "pot"
TARGET = "transformers.quantizers.auto"
_OFF = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether ``"pot"`` checkpoints load automatically: ``OPTIMUM_POT_AUTOLOAD`` unset or not ``0/false/no/off``."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def _import_optimum_pot():
    """Imports ``optimum_pot`` (which registers the real classes), or raises an ``ImportError`` naming the fix."""
    try:
        import optimum_pot
    except ImportError as e:
        raise ImportError(
            f'This checkpoint is quantised with optimum-pot (quant_method "{QUANT_METHOD}"), but importing '
            f"optimum_pot failed ({e}). Reinstall it: pip install optimum-pot"
        ) from e
    return optimum_pot


def _disabled_error() -> ImportError:
    return ImportError(
        f'This checkpoint is quantised with optimum-pot (quant_method "{QUANT_METHOD}") and automatic loading is '
        f"turned off ({ENV_VAR}={os.environ.get(ENV_VAR)}): run `import optimum_pot` before loading it, or unset "
        f"{ENV_VAR}. Without the package: pip install optimum-pot"
    )


class LazyPoTConfig:
    """Stands for ``optimum_pot.PoTConfig`` in transformers' config registry until optimum_pot is imported."""

    _optimum_pot_placeholder = True

    @classmethod
    def from_dict(cls, config_dict, *args, **kwargs):
        if not enabled():
            raise _disabled_error()
        return _import_optimum_pot().PoTConfig.from_dict(config_dict, *args, **kwargs)


class LazyPoTHfQuantizer:
    """Stands for ``optimum_pot``'s ``PoTHfQuantizer`` in transformers' quantizer registry (instantiating it returns
    the real quantizer)."""

    _optimum_pot_placeholder = True

    def __new__(cls, quantization_config, **kwargs):
        if not enabled():
            raise _disabled_error()
        _import_optimum_pot()
        from optimum_pot.hf.quantizer import PoTHfQuantizer

        return PoTHfQuantizer(quantization_config, **kwargs)


def add_placeholders(auto) -> None:
    """Puts the placeholders into ``transformers.quantizers.auto``'s registries (never over a registered class)."""
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LazyPoTConfig)
    auto.AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LazyPoTHfQuantizer)


def _on_loaded(module) -> None:
    try:
        add_placeholders(module)
    except Exception as e:  # a transformers without these registries: never break its import
        import warnings

        warnings.warn(
            f"optimum_pot_autoload: could not register 'pot' ({e!r}); use `import optimum_pot`.", stacklevel=2
        )


class _Loader:
    """Runs the real loader of ``transformers.quantizers.auto``, then adds the placeholders."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # Hand the module its real loader back first: tools that inspect __loader__ see nothing of us.
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _on_loaded(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _Finder:
    """A ``sys.meta_path`` finder that answers for ``transformers.quantizers.auto`` only, once."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        uninstall()  # one shot; also keeps the search below from finding this finder again
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Registers the placeholders now if transformers' registry is loaded, else when it loads. Idempotent."""
    auto = sys.modules.get(TARGET)
    if auto is not None:
        _on_loaded(auto)
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Removes the finder (placeholders already added stay; ``import optimum_pot`` replaces them)."""
    while _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


install()
