"""``PoTConfig``: the typed, validated configuration of a PoT quantisation (``quant_method="pot"``)."""

import fnmatch
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .format import families  # noqa: F401  (registers the built-in level-set families)
from .format.level_set import LevelSet
from .format.registry import families as registered_families
from .format.registry import get_level_set
from .library.ops import check_backend

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
DEFAULT_LEVELS = "sp2"  # measured best at equal kernel speed (docs/levels.md)
LM_HEADS = ("float", "int8")  # the float output head, or its int8 serving copy for CPU decoding

# Fields that never go to config.json: a tokenizer object, a calibration corpus.
_NOT_SERIALISED = ("tokenizer", "dataset")


class PoTConfig(QuantizationConfigMixin):
    """Configuration of power-of-two (PoT) weight quantisation.

    A weight is ``w = s · L[code] (+ z)``: ``L`` a table of levels that are each a signed power of two or a sum of
    two (``levels``), ``s`` one float16 scale per ``group_size`` input columns and, for level sets with an offset,
    ``z`` one float16 offset per group.

    Args:
        bits (`int`, *optional*, defaults to 4): bits per weight code: 2, 3 or 4.
        group_size (`int`, *optional*, defaults to 64):
            Input columns sharing one scale. Need not divide ``in_features``: the last group is then partial; a
            value larger than a layer means one group per row.
        levels (`str`, *optional*, defaults to `"sp2"`):
            The level-set family: ``"sp2"`` (non-uniform sums of two powers of two, the default), ``"int"``
            (uniform integers, each a sum of at most two powers of two) or ``"pot"`` (single-term ``±2^-e``, format
            version 1's only set). See docs/levels.md.
        zero_level (`bool`, *optional*):
            ``pot`` only: whether the all-ones exponent means an exact zero (`None`: yes).
        offset (`bool`, *optional*):
            Whether each group stores an offset ``z`` (one add per group at inference). `None`: the family's measured
            default.
        modules_to_not_convert (`list[str]`, *optional*):
            Module names or patterns kept in float. `None` keeps the defaults of transformers (``lm_head``, tied
            embeddings).
        module_bits (`dict[str, int]`, *optional*):
            Per-module bit widths overriding ``bits`` (full module names, as written by per-layer bit allocation).
        backend (`str`, *optional*, defaults to `"auto"`):
            Kernel for the forward pass: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cpu_int8"`` or ``"triton"``.
        grid_points (`int`, *optional*):
            Candidates of the per-group scale search of calibration-free quantisation (1: closed form). Default:
            what measured best for the level set: 1 for two-term sets with a per-group offset, else 16
            (docs/levels.md).
        refine_steps (`int`, *optional*):
            Rounds of least-squares refinement of scales (and offsets) after the search. Default: 0 for two-term
            sets with a per-group offset, else 2.
        dataset (`list[str]`, `datasets.Dataset` or `str`, *optional*):
            Calibration text. When given, the quantised model is calibrated block by block after loading.
        tokenizer (*optional*): tokenizer (or its name/path) for the calibration dataset.
        num_samples (`int`, *optional*, defaults to 16): calibration sequences (128 measured within 0.4 % at 7×
            the time).
        seq_len (`int`, *optional*, defaults to 512): tokens per calibration sequence.
        epochs (`int`, *optional*, defaults to 2): passes over the calibration set per block.
        learning_rate (`float`, *optional*, defaults to 1e-3): Adam learning rate of the scale residual.
        reg_lambda (`float`, *optional*, defaults to 1e-4): weight of ``λ‖Γ‖²``.
        calibration_batch_size (`int`, *optional*, defaults to 1): calibration samples per optimiser step.
        act_weighted_init (`bool`, *optional*, defaults to `True`): before calibration, re-run the scale search
            with each column's error weighted by its mean squared activation.
        rounding (`str`, *optional*, defaults to `"gptq"`): how calibration picks codes: ``"gptq"`` (error-feedback
            rounding through each layer's input Hessian) or ``"nearest"`` (nearest level; scales learned by step 2).
        damp_percent (`float`, *optional*, defaults to 0.01): ``"gptq"``: damping added to the Hessian's diagonal,
            as a fraction of its mean (> 0).
        act_order (`bool`, *optional*, defaults to `True`): ``"gptq"``: round columns by decreasing input energy.
        gptq_block_size (`int`, *optional*, defaults to 32): ``"gptq"``: columns per lazy batch update.
        true_sequential (`bool`, *optional*, defaults to `True`): ``"gptq"``: each layer's Hessian from inputs that
            went through the block's already-rounded layers (one partial pass per stage), not the float block's.
        group_scales (`str`, *optional*, defaults to `"static"`): ``"gptq"``: group scales searched before rounding
            (``"static"``) or re-searched as each group's columns are reached (``"dynamic"``).
        refine_scales (`bool`, *optional*): run PoTPTQ step 2 (learned scale residual, ``epochs`` passes) after the
            rounding. `None` (the default): yes (measured better after ``"gptq"`` at 2, 3 and 4 bits).
        amp (`bool`, *optional*): run step 2's block forward/backward in bfloat16 autocast (loss, scales and
            optimiser stay float32). `None` (the default): on for blocks of 4-bit (or wider) layers where bfloat16
            matmuls are fast (CUDA; CPUs with AMX or AVX512-BF16): there it measured the same perplexity in 30 % less
            time, while at 3 and 2 bits it cost 1-5 % perplexity (docs/calibration.md); off elsewhere.
        bit_budget (`float`, *optional*): average code bits per weight; calibration then chooses each layer's bits
            (2/3/4) from its measured sensitivity and writes them into ``module_bits``.
        lm_head (`str`, *optional*, defaults to `"float"`): with ``"int8"`` a float (not converted) output head
            gets an int8 per-row serving copy for CPU decoding (`optimum_pot.int8_lm_head`); the checkpoint still
            stores the float head. Ignored when the head is packed (``modules_to_not_convert=[]``).
        fuse_projections (`bool`, *optional*, defaults to `False`): after loading, run sibling layers that read
            the same input (``q/k/v_proj``, ``gate/up_proj``) as one packed matmul each
            (`optimum_pot.fuse_projections`): a serving option, bit-identical decode results, same checkpoint.
        format_version (`int`, *optional*): on-disk format version; set when saving, checked when loading.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        levels: str | None = None,
        zero_level: bool | None = None,
        offset: bool | None = None,
        modules_to_not_convert: list[str] | None = None,
        module_bits: dict[str, int] | None = None,
        backend: str = "auto",
        grid_points: int | None = None,
        refine_steps: int | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        num_samples: int = 16,
        seq_len: int = 512,
        epochs: int = 2,
        learning_rate: float = 1e-3,
        reg_lambda: float = 1e-4,
        calibration_batch_size: int = 1,
        act_weighted_init: bool = True,
        rounding: str = "gptq",
        damp_percent: float = 0.01,
        act_order: bool = True,
        gptq_block_size: int = 32,
        true_sequential: bool = True,
        group_scales: str = "static",
        refine_scales: bool | None = None,
        amp: bool | None = None,
        bit_budget: float | None = None,
        lm_head: str = "float",
        fuse_projections: bool = False,
        format_version: int = FORMAT_VERSION,
        **kwargs,
    ):
        self.quant_method = "pot"
        self.bits = bits
        self.group_size = group_size
        # Format version 1 had one level set; its config.json has no "levels" field.
        self.levels = levels if levels is not None else ("pot" if format_version == 1 else DEFAULT_LEVELS)
        self.zero_level = zero_level
        self.offset = offset
        self.modules_to_not_convert = modules_to_not_convert
        self.module_bits = module_bits
        self.backend = backend
        self.grid_points = grid_points
        self.refine_steps = refine_steps
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.reg_lambda = reg_lambda
        self.calibration_batch_size = calibration_batch_size
        self.act_weighted_init = act_weighted_init
        self.rounding = rounding
        self.damp_percent = damp_percent
        self.act_order = act_order
        self.gptq_block_size = gptq_block_size
        self.true_sequential = true_sequential
        self.group_scales = group_scales
        self.refine_scales = refine_scales
        self.amp = amp
        self.bit_budget = bit_budget
        self.lm_head = lm_head
        self.fuse_projections = fuse_projections
        self.format_version = format_version
        for key, value in kwargs.items():  # forward-compatible extra fields (e.g. perplexity notes)
            setattr(self, key, value)
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """Builds the config of a checkpoint's ``quantization_config`` (which must name its format version)."""
        if "format_version" not in config_dict:
            raise ValueError(
                "This PoT checkpoint's quantization_config has no format_version, so its codes cannot be decoded "
                "safely. Re-save it with optimum_pot, or add the version it was written with (1 for checkpoints "
                "without a 'levels' field) to config.json."
            )
        return super().from_dict(config_dict, return_unused_kwargs, **kwargs)

    def post_init(self):
        """Validates every field; raises `ValueError` naming the valid values."""
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS or isinstance(self.format_version, bool):
            raise ValueError(
                f"This checkpoint uses PoT format version {self.format_version!r}, but this optimum_pot reads "
                f"versions {list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade optimum_pot (pip install -U optimum-pot)."
            )
        _check_int("bits", self.bits, (2, 3, 4))
        _check_int("group_size", self.group_size)
        if self.levels not in registered_families():
            raise ValueError(f"levels must be one of {registered_families()} (see docs/levels.md), got "
                             f"{self.levels!r}.")  # fmt: skip
        for name in ("zero_level", "offset"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True, False or None, got {getattr(self, name)!r}.")
        if self.module_bits is not None and not isinstance(self.module_bits, dict):
            raise ValueError(f"module_bits must be a dict {{module name: bits}}, got {self.module_bits!r}.")
        self.level_set_for("")  # the family exists at these bits with these options (raises naming why)
        check_backend(self.backend)
        _check_names("modules_to_not_convert", self.modules_to_not_convert)
        if self.module_bits is not None:
            _check_names("module_bits", list(self.module_bits))
            for name, b in self.module_bits.items():
                _check_int(f"module_bits[{name!r}]", b, (2, 3, 4))
                self.level_set_for(name)
        for name in ("num_samples", "seq_len", "epochs", "calibration_batch_size"):
            _check_int(name, getattr(self, name))
        if self.grid_points is not None:
            _check_int("grid_points", self.grid_points)
        if self.refine_steps is not None:
            _check_int("refine_steps", self.refine_steps, minimum=0)
        from .calibration.options import check_calibration_fields, finite_number

        for name, low in (("learning_rate", None), ("reg_lambda", 0.0)):
            v = getattr(self, name)
            if not finite_number(v) or not (v > 0 if low is None else v >= low):
                raise ValueError(f"{name} must be a finite number {'> 0' if low is None else '>= 0'}, got {v!r}.")
        for name in ("act_weighted_init", "fuse_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.lm_head not in LM_HEADS:
            raise ValueError(f"lm_head must be one of {list(LM_HEADS)} (docs/cpu_kernel.md), got {self.lm_head!r}.")
        check_calibration_fields(self)

    def bits_for(self, module_name: str) -> int:
        """Bit width of ``module_name``: its ``module_bits`` override, else ``bits``."""
        return (self.module_bits or {}).get(module_name, self.bits)

    def level_set_for(self, module_name: str) -> LevelSet:
        """The :class:`LevelSet` of ``module_name`` (its ``module_bits`` override, else ``bits``)."""
        return get_level_set(self.levels, self.bits_for(module_name), self.zero_level, self.offset)

    @property
    def level_set(self) -> LevelSet:
        """The level set of layers without a ``module_bits`` override."""
        return self.level_set_for("")

    def unknown_module_bits(self, module_names) -> list[str]:
        """Keys of ``module_bits`` that name none of ``module_names`` (a typo would silently keep ``bits``)."""
        names = set(module_names)
        return sorted(k for k in self.module_bits or {} if k not in names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: the tokenizer and an in-memory dataset are left out."""
        out = {k: v for k, v in self.__dict__.items() if k not in _NOT_SERIALISED}
        out["format_version"] = FORMAT_VERSION  # what this version writes (a loaded version-1 model saves as 2)
        if isinstance(self.dataset, str):
            out["dataset"] = self.dataset
        return out


def _check_int(name: str, value, allowed=None, minimum: int = 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if allowed is not None and (not ok or value not in allowed):
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")
    if not ok or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_names(field: str, names) -> None:
    if names is None:
        return
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field} must be a list of module names or patterns (non-empty strings), got {names!r}.")


def matches(name: str, patterns) -> bool:
    """Whether module ``name`` matches one of ``patterns`` (exact, suffix after a dot, or a glob)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns or ())
