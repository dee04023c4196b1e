"""``calibrate``: calibrated PTQ over a whole model, one decoder block at a time."""

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import allocate_bits
from .blocks import capture_inputs, find_blocks
from .data import calibration_samples
from .options import refines_scales
from .refine import refine_block
from .sequential import gptq_block
from .weights import FloatWeights

logger = logging.getLogger(__name__)

# Above this many bytes of cached activations (inputs + outputs), an accelerator keeps them in CPU memory.
OFFLOAD_BYTES = 2 << 30


def _cache_device(device: torch.device, samples: torch.Tensor, hidden_size: int) -> torch.device:
    size = 2 * samples.numel() * hidden_size * 4  # inputs and outputs, float32
    return torch.device("cpu") if device.type != "cpu" and size > OFFLOAD_BYTES else device


def calibrate(model: nn.Module, config, dataset, progress: bool = True) -> list[dict]:
    """Calibrates a quantised ``model`` in place on calibration text, block by block (docs/calibration.md).

    Block ``i`` sees the outputs of the already-calibrated blocks ``< i``. With ``config.rounding="gptq"`` (the
    default) each layer's codes come from error-feedback rounding through its input Hessian (``sequential.py``,
    ``gptq.py``); with ``"nearest"`` from the nearest level. PoTPTQ step 2 (a learned per-group scale residual,
    ``refine.py``) follows unless ``config.refine_scales=False``. With
    ``config.bit_budget``, each layer's bits are chosen first (``allocation.py``) and written into
    ``config.module_bits``. Results are packed into each ``PoTLinear``.

    Args:
        model (`torch.nn.Module`): a model whose linear layers are ``PoTLinear`` (see ``weights.py`` for where the
            float targets come from).
        config (`PoTConfig`): ``tokenizer``, ``num_samples``, ``seq_len`` and the calibration fields.
        dataset: list of strings, ``datasets.Dataset``, dataset name or text file path.
        progress (`bool`): show a progress bar over the blocks (with each block's error before and after).

    Returns:
        `list[dict]`: per block: ``before`` / ``after`` relative output error against the float block (on the first
        ``ERROR_SAMPLES`` samples; before = the calibration-free quantisation), ``seconds``, ``cpu_seconds``,
        ``float_block_mb`` and ``activations_mb`` (the working set); with a budget, a first ``{"allocation": ...}``.
    """
    config.post_init()
    samples = calibration_samples(dataset, config.tokenizer, config.num_samples, config.seq_len)
    prefix, blocks = find_blocks(model)
    weights = FloatWeights(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = capture_inputs(model, blocks[0], samples, device)
    hidden_size = inputs.hidden[0].shape[-1]
    cache = _cache_device(device, samples, hidden_size)
    hidden = [h.float().to(cache) for h in inputs.hidden]
    inputs.hidden = []
    report = []
    if config.bit_budget is not None:
        t0, c0 = time.perf_counter(), time.process_time()
        spent = allocate_bits(model, prefix, blocks, weights, inputs, hidden, samples, config, progress)
        spent.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
        report.append({"allocation": spent})
    step = refine_block if config.rounding == "nearest" else gptq_block
    bar = tqdm(blocks, desc="calibrating", unit="block", disable=not progress)
    for i, block in enumerate(bar):
        t0, c0 = time.perf_counter(), time.process_time()
        hidden, row = step(f"{prefix}.{i}", block, weights, inputs, hidden, config, progress)
        row.update(block=i, seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
        report.append(row)
        bar.set_postfix_str(f"block {i} error {row['before']:.2e} -> {row['after']:.2e}")
        logger.info("block %d: relative output error %.3e -> %.3e (%.1f s, %.1f CPU s)", i, row["before"],
                    row["after"], row["seconds"], row["cpu_seconds"])  # fmt: skip
    model.train(was_training)
    model.pot_calibration_report = report  # what from_pretrained's caller can read back (timings, errors, budget)
    return report


__all__ = ["calibrate", "refines_scales"]
