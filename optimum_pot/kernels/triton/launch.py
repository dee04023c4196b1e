"""Launchers for the Triton kernels and the ``optimum_pot::pot_linear_triton`` op.

Imported lazily (on the first call of the ``triton`` backend), so ``import optimum_pot`` never imports triton. The
op is a :func:`torch.library.triton_op` whose body only uses PyTorch ops and :func:`torch.library.wrap_triton`
launches, so ``torch.compile`` traces into the kernels instead of treating them as opaque (``torch.export`` keeps
the op whole, by PyTorch's design for triton ops).
Tile sizes come from fixed shape heuristics (no autotuning: nothing here has been timed on a GPU yet).
"""

from dataclasses import dataclass

import torch
import triton
from torch.library import triton_op, wrap_triton

from ...format.groups import num_groups
from ...format.level_set import SUPPORTED_BITS, LevelSet
from ...format.packing import packed_row_bytes
from ...format.registry import from_id
from . import tables
from .dequant import MODE_LEVELS, MODE_UNIFORM
from .matmul import dequant_kernel, gemm_kernel, gemv_kernel

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GEMV_MAX_M = 8  # up to this many rows, the split-K GEMV beats padding a 16-row tl.dot tile
GEMV_TARGET_PROGRAMS = 512  # enough programs to fill a large GPU when N alone is too small
# Decided when the kernels were decorated (this import): the interpreter needs bfloat16 work-arounds, see dequant.py.
INTERPRETED = bool(triton.knobs.runtime.interpret)
_TABLES: dict[tuple[LevelSet, torch.device], torch.Tensor] = {}  # (level set, device) -> descriptors, built once


@dataclass(frozen=True)
class PackedWeight:
    """A packed weight and how to decode it.

    ``uniform=True`` is the benchmark's baseline: ``(q − offset)·s`` with ``offset`` the zero points (the level set
    then only gives the bits).
    """

    packed: torch.Tensor  # uint8 [N, ceil(K/8)·bits]
    scale: torch.Tensor  # [N, G]
    offset: torch.Tensor | None  # [N, G] or None
    level_set: LevelSet
    group_size: int
    in_features: int
    uniform: bool = False

    @property
    def bits(self) -> int:
        return self.level_set.bits

    def kernel_args(self) -> tuple:
        """Tensor arguments shared by every kernel: ``(w_ptr, s_ptr, z_ptr, t_ptr)``."""
        z = self.scale if self.offset is None else self.offset  # unread without offsets
        t = self.scale if self.uniform else level_table(self.level_set, self.packed)  # unread when uniform
        return self.packed, self.scale, z, t

    def meta(self) -> dict:
        """Constexpr arguments shared by every kernel."""
        return dict(
            GROUP=self.group_size,
            BITS=self.bits,
            TERMS=self.level_set.max_terms,  # 1 or 2 (LevelSet.MAX_TERMS)
            HALF_SAFE=self.scale.dtype == torch.float16 and tables.half_safe(self.level_set),
            HAS_OFFSET=self.offset is not None and not self.uniform,
            MODE=MODE_UNIFORM if self.uniform else MODE_LEVELS,
            INTERPRETED=INTERPRETED,
        )


def level_table(level_set: LevelSet, like: torch.Tensor) -> torch.Tensor:
    """The level set's descriptors (int32 ``[2^bits]``, kernels/triton/tables.py) on ``like``'s device.

    Cached per device for eager calls; built afresh while tracing (fake or functional tensors: ``torch.compile``
    records it as a graph constant).
    """
    if type(like) not in (torch.Tensor, torch.nn.Parameter):
        return torch.tensor(tables.descriptors(level_set), dtype=torch.int32, device=like.device)
    key = (level_set, like.device)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = torch.tensor(tables.descriptors(level_set), dtype=torch.int32, device=like.device)
    return table


def _check(weight: PackedWeight, x: torch.Tensor | None) -> None:
    """Clear errors for inputs the kernels cannot take (shape-only checks, so tracing is unaffected)."""
    w = weight
    if w.bits not in SUPPORTED_BITS:
        raise ValueError(f"The Triton PoT kernels support bits in {SUPPORTED_BITS}, got bits={w.bits}.")
    reason = tables.unsupported_reason(w.level_set)
    if reason is not None and not w.uniform:
        raise ValueError(f"The Triton kernels cannot decode level set {w.level_set.id} ({reason}); use the reference.")
    if w.packed.dtype != torch.uint8 or w.packed.dim() != 2:
        raise ValueError(f"Packed weights must be a 2-D uint8 tensor, got {w.packed.dtype} {tuple(w.packed.shape)}.")
    n = w.packed.shape[0]
    if w.packed.shape[1] != packed_row_bytes(w.in_features, w.bits):
        raise ValueError(
            f"Packed weight has {w.packed.shape[1]} bytes per row; in_features={w.in_features} at {w.bits} bits "
            f"needs {packed_row_bytes(w.in_features, w.bits)}. Re-pack it with optimum_pot.format.packing.pack."
        )
    expected = (n, num_groups(w.in_features, w.group_size))
    for what, t in (("Scales", w.scale), ("Offsets", w.offset)):
        if t is not None and (tuple(t.shape) != expected or not t.is_floating_point()):
            raise ValueError(f"{what} must be a float tensor of shape {expected}, got {t.dtype} {tuple(t.shape)}.")
    if (w.offset is not None) != (w.level_set.offset or w.uniform):
        raise ValueError(f"Level set {w.level_set.id} {'needs' if w.level_set.offset else 'takes no'} offsets.")
    if x is not None:
        devices = {t.device for t in (x, w.packed, w.scale, w.offset) if t is not None}
        if len(devices) > 1:
            raise ValueError(f"Activations and weights must be on one device, got {sorted(map(str, devices))}.")
        if x.dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"The Triton PoT kernels take {ACTIVATION_DTYPES} activations, got {x.dtype}; cast x.")
        if x.shape[-1] != w.in_features:
            raise ValueError(f"x has {x.shape[-1]} features but the weight expects in_features={w.in_features}.")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride (the kernels index columns densely)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def fit_block_k(bk: int, group_size: int) -> int:
    """Halves ``bk`` (down to 16, ``tl.dot``'s minimum) until it divides the group size, so that a K tile lies in one
    scale group and the kernel loads one scale per row instead of one per column."""
    while bk > 16 and group_size % bk:
        bk //= 2
    return bk


def gemm_config(m: int, n: int, group_size: int, dtype: torch.dtype) -> dict:
    """Tile sizes for the tiled GEMM (``tl.dot`` needs every block dimension ≥ 16).

    Chosen without a GPU: the configurations compile ahead of time for sm_80/sm_90 without register spills
    (tests/triton_compile_check.py), but none has been timed; autotuning needs a GPU.
    """
    if dtype == torch.float32:  # IEEE float32 dots run on FMA units and need far more registers
        cfg = dict(BM=16, BN=64, BK=32, num_warps=4) if m <= 16 else dict(BM=64, BN=64, BK=32, num_warps=8)
    elif m <= 64:  # 8 warps: decoding a 64×64 weight tile with 4 warps needs ≈250 registers per thread
        cfg = dict(BM=max(16, triton.next_power_of_2(m)), BN=64, BK=64, num_warps=8)
    else:
        cfg = dict(BM=128, BN=128 if n >= 4096 else 64, BK=32, num_warps=8)
    cfg["BK"] = fit_block_k(cfg["BK"], group_size)
    return dict(cfg, GROUP_M=8, num_stages=3)


def gemv_config(m: int, n: int, k: int, group_size: int) -> dict:
    """Tile sizes and split count for the split-K GEMV.

    ``BN = 16`` and ``BM·BK ≤ 256`` keep the ``[BM, BN, BK]`` product in ≈64 registers per thread at 4 warps
    (measured with an ahead-of-time sm_90 compile, no spills), so many programs fit on each SM.
    """
    bm = triton.next_power_of_2(m)
    bn, bk = 16, fit_block_k(max(32, min(128, 256 // bm)), group_size)
    k_tiles, n_tiles = triton.cdiv(k, bk), triton.cdiv(n, bn)
    split = max(1, min(k_tiles, triton.cdiv(GEMV_TARGET_PROGRAMS, n_tiles)))
    k_per_split = triton.cdiv(k_tiles, split) * bk
    return dict(BM=bm, BN=bn, BK=bk, split=triton.cdiv(k, k_per_split), k_per_split=k_per_split)


def _gemm(x2, weight, bias, out):
    m, n = out.shape
    cfg = gemm_config(m, n, weight.group_size, x2.dtype)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    wrap_triton(gemm_kernel)[grid](
        x2, *weight.kernel_args(), out if bias is None else bias, out, m, n, weight.in_features,
        x2.stride(0), weight.packed.stride(0), weight.scale.stride(0), HAS_BIAS=bias is not None,
        FP32_DOT=x2.dtype == torch.float32 or (INTERPRETED and x2.dtype == torch.bfloat16), **weight.meta(), **cfg,
    )  # fmt: skip
    return out


def _gemv(x2, weight, bias, out, split=None):
    m, n = out.shape
    k = weight.in_features
    cfg = gemv_config(m, n, k, weight.group_size)
    if split is not None:  # tests force a split count
        cfg["k_per_split"] = triton.cdiv(triton.cdiv(k, cfg["BK"]), split) * cfg["BK"]
        cfg["split"] = triton.cdiv(k, cfg["k_per_split"])
    n_split, k_per_split = cfg.pop("split"), cfg.pop("k_per_split")
    dst = out if n_split == 1 else out.new_empty((n_split, m, n), dtype=torch.float32)
    grid = (triton.cdiv(n, cfg["BN"]), n_split)
    wrap_triton(gemv_kernel)[grid](
        x2, *weight.kernel_args(), out if bias is None else bias, dst, m, n, k, k_per_split,
        x2.stride(0), weight.packed.stride(0), weight.scale.stride(0), HAS_BIAS=bias is not None,
        SPLIT=n_split > 1, **weight.meta(), **cfg,
    )  # fmt: skip
    if n_split == 1:
        return out
    y = dst.sum(0)  # [M, N] float32: the second stage of the split-K reduction
    if bias is not None:
        y = y + bias.float()
    return y.to(out.dtype)


def linear(
    x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, kernel: str = "auto", split: int | None = None
) -> torch.Tensor:
    """``x @ W.T + bias`` with the Triton kernels; ``x`` ``[..., K]`` → ``[..., N]`` in ``x``'s dtype.

    Args:
        x (`torch.Tensor`): activations, float16, bfloat16 or float32.
        weight (`PackedWeight`): the packed weight.
        bias (`torch.Tensor`, *optional*): ``[N]``.
        kernel (`str`): ``"auto"`` (GEMV for up to ``GEMV_MAX_M`` rows, else GEMM), ``"gemv"`` or ``"gemm"``.
        split (`int`, *optional*): forces the GEMV's split-K count (tests).
    """
    _check(weight, x)
    n = weight.packed.shape[0]
    x2 = _rows(x.reshape(-1, weight.in_features))  # [M, K]
    out = x2.new_empty((x2.shape[0], n))
    if x2.shape[0] == 0:
        return out.reshape(*x.shape[:-1], n)
    if kernel not in ("auto", "gemv", "gemm"):
        raise ValueError(f"kernel must be 'auto', 'gemv' or 'gemm', got {kernel!r}.")
    if kernel == "gemv" and x2.shape[0] > GEMV_MAX_M:
        raise ValueError(f"The GEMV kernel takes at most {GEMV_MAX_M} rows, got {x2.shape[0]}; use kernel='gemm'.")
    bias = None if bias is None else bias.contiguous()
    weight = _contiguous(weight)
    use_gemv = kernel == "gemv" or (kernel == "auto" and x2.shape[0] <= GEMV_MAX_M)
    y = _gemv(x2, weight, bias, out, split) if use_gemv else _gemm(x2, weight, bias, out)
    return y.reshape(*x.shape[:-1], n)


def _contiguous(w: PackedWeight) -> PackedWeight:
    """Dense rows for the packed codes, and scales and offsets sharing one row stride."""
    offset = None if w.offset is None else w.offset.contiguous()
    return PackedWeight(_rows(w.packed), w.scale.contiguous(), offset, w.level_set, w.group_size, w.in_features,
                        w.uniform)  # fmt: skip


def dequantize(weight: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Decodes the whole weight to ``[N, K]`` in ``dtype`` with the dequantise-only kernel."""
    _check(weight, None)
    n, k = weight.packed.shape[0], weight.in_features
    out = torch.empty((n, k), dtype=dtype, device=weight.packed.device)
    bn, bk = 32, fit_block_k(128, weight.group_size)
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    weight = _contiguous(weight)
    wrap_triton(dequant_kernel)[grid](
        *weight.kernel_args(), out, n, k, weight.packed.stride(0), weight.scale.stride(0), **weight.meta(), BN=bn, BK=bk
    )
    return out


@triton_op("optimum_pot::pot_linear_triton", mutates_args=())
def pot_linear_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    levels: str,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The Triton implementation of ``optimum_pot::pot_linear`` (same arguments, ``levels`` the level-set id, no
    backend)."""
    return linear(x, PackedWeight(packed, scale, offset, from_id(levels), group_size, in_features), bias)
