"""``PoTQuantizer``: PoT quantisation behind optimum's ``OptimumQuantizer`` interface.

Example::

    >>> from optimum_pot import PoTConfig, PoTQuantizer
    >>> quantizer = PoTQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    >>> quantizer.quantize(save_dir="smollm2-pot", quantization_config=PoTConfig(bits=4, group_size=64))
"""

from pathlib import Path

import torch
from optimum.quantization_base import OptimumQuantizer

from .api import quantize as quantize_model
from .config import PoTConfig


class PoTQuantizer(OptimumQuantizer):
    """Quantises a float transformers model to PoT (optionally calibrated) and saves it.

    Args:
        model (`transformers.PreTrainedModel`): the float model.
        tokenizer (*optional*): saved next to the model, and the default calibration tokenizer.
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_or_path, file_name: str | None = None, **kwargs) -> "PoTQuantizer":
        """Loads a float causal LM (and its tokenizer when there is one) from a path or Hub id.

        Args:
            model_or_path (`str`, `Path` or `PreTrainedModel`): a model, or where to load one from.
            file_name (`str`, *optional*): unused (a transformers checkpoint is a directory); kept for the interface.
            kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
        """
        if isinstance(model_or_path, torch.nn.Module):
            return cls(model_or_path)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_or_path), **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_or_path))
        except Exception:  # a checkpoint without a tokenizer can still be quantised calibration-free
            tokenizer = None
        return cls(model, tokenizer)

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        quantization_config: PoTConfig | None = None,
        dataset=None,
        **kwargs,
    ):
        """Quantises the model in place (calibrating when a dataset is given) and saves it to ``save_dir``.

        Args:
            save_dir (`str` or `Path`): output directory (``save_pretrained`` layout, for ``from_pretrained``).
            file_prefix (`str`, *optional*): unused; transformers names the files.
            quantization_config (`PoTConfig`, *optional*): defaults to ``PoTConfig()``; ``PoTConfig`` fields may also
                be given as keyword arguments.
            dataset (*optional*): calibration text (list of strings, ``datasets.Dataset``, name or file path).

        Returns:
            The quantised model.
        """
        if quantization_config is None:
            quantization_config = PoTConfig(**kwargs)
        elif kwargs:
            raise ValueError(f"Pass either quantization_config or PoTConfig fields, not both (got {sorted(kwargs)}).")
        if (dataset is not None or quantization_config.dataset is not None) and quantization_config.tokenizer is None:
            quantization_config.tokenizer = self.tokenizer
        quantize_model(self.model, quantization_config, dataset)
        self.model.save_pretrained(save_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_dir)
        return self.model
