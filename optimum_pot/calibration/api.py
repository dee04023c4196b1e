"""``calibrate``: PoTPTQ step 2 over a whole model, one decoder block at a time."""

import logging
import time

import torch
from torch import nn

from ..format.weights import quantize_weight
from .blocks import BlockInputs, block_output, capture_inputs, find_blocks
from .data import calibration_samples
from .refine import float_block, optimise, pot_modules, relative_error, trainable_block
from .weights import FloatWeights

logger = logging.getLogger(__name__)

# Above this many bytes of cached activations (inputs + targets), an accelerator keeps them in CPU memory.
OFFLOAD_BYTES = 2 << 30
# Samples used to measure each block's error before refinement (the error after it comes for free).
ERROR_SAMPLES = 8


def _cache_device(device: torch.device, samples: torch.Tensor, hidden_size: int) -> torch.device:
    size = 2 * samples.numel() * hidden_size * 4  # inputs and targets, float32
    return torch.device("cpu") if device.type != "cpu" and size > OFFLOAD_BYTES else device


def calibrate(model: nn.Module, config, dataset, progress: bool = True) -> list[dict]:
    """Refines the scales of a PoT-quantised ``model`` in place on calibration text (PoTPTQ step 2).

    Block by block, with the outputs of the already-refined blocks as inputs, a per-group scale residual ``Γ`` is
    learned so the quantised block reproduces the float block (see ``refine.py``); codes are then re-derived from
    the float weights and the learned scale and re-packed into each ``PoTLinear``.

    Args:
        model (`torch.nn.Module`): a model whose linear layers are ``PoTLinear`` (see ``weights.py`` for where the
            float targets come from).
        config (`PoTConfig`): ``tokenizer``, ``num_samples``, ``seq_len``, ``epochs``, ``learning_rate``,
            ``reg_lambda``, ``calibration_batch_size``, ``act_weighted_init``.
        dataset: list of strings, ``datasets.Dataset``, dataset name or text file path.
        progress (`bool`): show a progress bar per block.

    Returns:
        `list[dict]`: per block, its relative output error before and after refinement and the time it took.
    """
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
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        with torch.enable_grad():
            hidden, row = _calibrate_block(f"{prefix}.{i}", block, weights, inputs, hidden, config, progress)
        row.update(block=i, seconds=time.perf_counter() - t0)
        report.append(row)
        logger.info("block %d: relative error %.3e -> %.3e (%.1fs)", i, row["before"], row["after"], row["seconds"])
    model.train(was_training)
    return report


def _calibrate_block(name, block, weights, inputs: BlockInputs, hidden, cfg, progress) -> tuple[list, dict]:
    """Refines one block; returns the next block's inputs and this block's error report."""
    mods = pot_modules(block)
    with torch.no_grad():
        if not mods:  # nothing to learn: pass the activations on
            return [block_output(block, x, inputs).float().to(x.device) for x in hidden], {"before": 0.0, "after": 0.0}
        device = mods[0][1].weight.device
        w = {n: weights.get(f"{name}.{n}", m).to(device) for n, m in mods}
        fblock = float_block(block, w).eval()
        targets = [block_output(fblock, x, inputs).to(x.device) for x in hidden]
        importance = {n: m.sq_sum / m.rows for n, m in fblock.named_modules() if hasattr(m, "sq_sum")}
        del fblock
        tblock = trainable_block(block, w, importance if cfg.act_weighted_init else None, cfg).eval()
        k = min(ERROR_SAMPLES, len(hidden))
        before = relative_error(tblock, inputs, hidden[:k], targets[:k])
    history = optimise(tblock, inputs, hidden, targets, cfg, f"calibrating {name}", progress)
    with torch.no_grad():
        for n, m in mods:
            fq = tblock.get_submodule(n)
            packed, scale, offset = quantize_weight(
                w[n], m.level_set, m.group_size, name=f"{name}.{n}", scale=fq.final_scale(), offset=fq.offset
            )
            m.set_quantized(packed, scale, offset)
            fq.scale.copy_(scale.float())  # the stored scale, so the next inputs are the quantised block's outputs
            if offset is not None:
                fq.offset.copy_(offset.float())
            fq.gamma.zero_()
            FloatWeights.release(m)
        after = relative_error(tblock, inputs, hidden[:k], targets[:k])
        nxt = [block_output(tblock, x, inputs).to(x.device) for x in hidden]
    return nxt, {"before": before, "after": after, "loss_per_epoch": history}
