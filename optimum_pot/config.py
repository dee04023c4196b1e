"""``PoTConfig``: the typed, validated configuration of a PoT quantisation (``quant_method="pot"``)."""

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .format.levels import SUPPORTED_BITS
from .library.ops import check_backend

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

# Fields that never go to config.json: a tokenizer object, a calibration corpus.
_NOT_SERIALISED = ("tokenizer", "dataset")


class PoTConfig(QuantizationConfigMixin):
    """Configuration of power-of-two (PoT) weight quantisation.

    Args:
        bits (`int`, *optional*, defaults to 4):
            Bits per weight: one sign bit and ``bits - 1`` exponent bits. One of 2, 3, 4.
        group_size (`int`, *optional*, defaults to 128):
            Input columns sharing one scale. Need not divide ``in_features``: the last group is then partial.
        zero_level (`bool`, *optional*, defaults to `True`):
            Whether the last exponent code means an exact zero (see docs/levels.md for the measurement).
        modules_to_not_convert (`list[str]`, *optional*):
            Module names or patterns kept in float. `None` keeps the defaults of transformers (``lm_head``, tied
            embeddings).
        module_bits (`dict[str, int]`, *optional*):
            Per-module bit widths overriding ``bits`` (full module names, as written by per-layer bit allocation).
        backend (`str`, *optional*, defaults to `"auto"`):
            Kernel for the forward pass: ``"auto"`` (best available for the device), ``"reference"``, ``"cpu"``,
            ``"cpu_int8"`` (CPU decode with int8 activations and integer accumulation: faster, slightly less exact;
            see docs/cpu_kernel.md) or ``"triton"``.
        grid_points (`int`, *optional*, defaults to 32):
            Candidates of the per-group scale grid search of calibration-free quantisation (1: closed form).
        dataset (`list[str]`, `datasets.Dataset` or `str`, *optional*):
            Calibration text. When given, quantisation runs PoTPTQ step 2 (scale refinement) after loading.
        tokenizer (*optional*):
            Tokenizer (or its name/path) for the calibration dataset.
        num_samples (`int`, *optional*, defaults to 128): calibration sequences.
        seq_len (`int`, *optional*, defaults to 512): tokens per calibration sequence.
        epochs (`int`, *optional*, defaults to 2): passes over the calibration set per block.
        learning_rate (`float`, *optional*, defaults to 1e-3): Adam learning rate of the scale residual.
        reg_lambda (`float`, *optional*, defaults to 1e-4): weight of ``λ‖Γ‖²``.
        calibration_batch_size (`int`, *optional*, defaults to 1): calibration samples per optimiser step.
        act_weighted_init (`bool`, *optional*, defaults to `True`): before learning ``Γ``, re-run the step-1 scale
            search with each column's error weighted by its mean squared activation (see docs/calibration.md).
        format_version (`int`, *optional*): on-disk format version; set when saving, checked when loading.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        zero_level: bool = True,
        modules_to_not_convert: list[str] | None = None,
        module_bits: dict[str, int] | None = None,
        backend: str = "auto",
        grid_points: int = 32,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        epochs: int = 2,
        learning_rate: float = 1e-3,
        reg_lambda: float = 1e-4,
        calibration_batch_size: int = 1,
        act_weighted_init: bool = True,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = "pot"
        self.bits = bits
        self.group_size = group_size
        self.zero_level = zero_level
        self.modules_to_not_convert = modules_to_not_convert
        self.module_bits = module_bits
        self.backend = backend
        self.grid_points = grid_points
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.reg_lambda = reg_lambda
        self.calibration_batch_size = calibration_batch_size
        self.act_weighted_init = act_weighted_init
        self.format_version = format_version
        for key, value in kwargs.items():  # forward-compatible extra fields (e.g. perplexity notes)
            setattr(self, key, value)
        self.post_init()

    def post_init(self):
        """Validates every field; raises `ValueError` naming the valid values."""
        _check_bits("bits", self.bits)
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0:
            raise ValueError(f"group_size must be a positive integer (e.g. 32, 64, 128), got {self.group_size!r}.")
        check_backend(self.backend)
        if not isinstance(self.zero_level, bool):
            raise ValueError(f"zero_level must be True or False, got {self.zero_level!r}.")
        if self.modules_to_not_convert is not None and not isinstance(self.modules_to_not_convert, list | tuple):
            raise ValueError("modules_to_not_convert must be a list of module names or patterns, or None.")
        for name, b in (self.module_bits or {}).items():
            _check_bits(f"module_bits[{name!r}]", b)
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"This checkpoint uses PoT format version {self.format_version!r}, but this optimum_pot reads "
                f"versions {list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade optimum_pot (pip install -U optimum-pot)."
            )
        _check_positive_int("grid_points", self.grid_points)
        for name in ("num_samples", "seq_len", "epochs", "calibration_batch_size"):
            _check_positive_int(name, getattr(self, name))
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if not self.reg_lambda >= 0:
            raise ValueError(f"reg_lambda must be >= 0, got {self.reg_lambda!r}.")
        if not isinstance(self.act_weighted_init, bool):
            raise ValueError(f"act_weighted_init must be True or False, got {self.act_weighted_init!r}.")

    def bits_for(self, module_name: str) -> int:
        """Bit width of ``module_name``: its ``module_bits`` override, else ``bits``."""
        return (self.module_bits or {}).get(module_name, self.bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: the tokenizer and an in-memory dataset are left out."""
        out = {k: v for k, v in self.__dict__.items() if k not in _NOT_SERIALISED}
        if isinstance(self.dataset, str):
            out["dataset"] = self.dataset
        return out


def _check_bits(name: str, value) -> None:
    if value not in SUPPORTED_BITS or isinstance(value, bool):
        raise ValueError(f"{name} must be one of {list(SUPPORTED_BITS)}, got {value!r}.")


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
