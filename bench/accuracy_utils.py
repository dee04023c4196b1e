"""Helpers of ``bench/accuracy.py``: the uniform-int baseline, HQQ / optimum-quanto wrappers, peak-RSS sampling,
what a PoT checkpoint stores per weight and a summary of a calibration report."""

import threading
import time

import psutil
import torch
from torch import nn

from optimum_pot.format.groups import group_view


def _linear_targets(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(skip)]


@torch.no_grad()
def uniform_fake_quant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Asymmetric min/max round-to-nearest int quantisation per group of ``group_size`` columns, dequantised."""
    n, k = w.shape
    g = group_view(w.float(), group_size)  # [N, G, g] (zero padded)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(g / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(n, -1)[:, :k].to(w.dtype)


def quantize_uniform(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Replaces every linear weight (but ``lm_head``) by its uniform int RTN fake-quantised copy, in place."""
    for _, m in _linear_targets(model):
        m.weight.data = uniform_fake_quant(m.weight.data, bits, group_size)
    return model


def quantize_hqq(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """HQQ's own API (``HQQLinear``, half-quadratic optimised zero/scale), on CPU in float32."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    for name, m in _linear_targets(model):
        model.set_submodule(name, HQQLinear(m, cfg, compute_dtype=torch.float32, device="cpu"))
    return model


def quantize_quanto(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """optimum-quanto's ``quantize``/``freeze`` (qint4 / qint2 only; its group size forced to ``group_size``)."""
    from optimum.quanto import freeze, qint2, qint4, quantize

    qtype = {4: qint4, 2: qint2}.get(bits)
    if qtype is None:
        raise ValueError(f"optimum-quanto has no {bits}-bit integer weight type")
    quantize(model, weights=qtype, exclude=["lm_head"])
    for m in model.modules():
        if getattr(m, "weight_group_size", None) is not None:
            m.weight_group_size = group_size  # quanto picks 128 itself; compare at the same group size
    freeze(model)
    return model


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the largest value seen (bytes)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def stored_bits_per_weight(model: nn.Module) -> float:
    """Bits the PoT layers store per weight: packed codes + float16 scales + float16 offsets, over ``N·K`` weights."""
    from optimum_pot.nn.convert import pot_layers

    bits = weights = 0
    for _, m in pot_layers(model):
        for t in (m.weight, m.weight_scale, m.weight_offset):
            bits += 0 if t is None else t.numel() * t.element_size() * 8
        weights += m.out_features * m.in_features
    return bits / max(weights, 1)


def calibration_summary(report: list[dict] | None) -> dict:
    """Totals of ``calibrate()``'s report: wall / CPU seconds, mean per block, the largest working set."""
    if not report:
        return {}
    blocks = [r for r in report if "block" in r]
    alloc = [r["allocation"] for r in report if "allocation" in r]
    out = {
        "seconds": sum(r["seconds"] for r in blocks) + sum(a.get("seconds", 0.0) for a in alloc),
        "cpu_seconds": sum(r["cpu_seconds"] for r in blocks) + sum(a.get("cpu_seconds", 0.0) for a in alloc),
        "block_seconds": sum(r["seconds"] for r in blocks) / max(len(blocks), 1),
        "float_block_mb": max(r.get("float_block_mb", 0.0) for r in blocks),
        "activations_mb": max(r.get("activations_mb", 0.0) for r in blocks),
    }
    if alloc:
        out["allocation"] = alloc[0]
    return out
