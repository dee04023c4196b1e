"""Finding the decoder blocks of a model and catching the inputs of the first one (the GPTQ "Catcher" trick)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.pot_linear import PoTLinear


class _Caught(Exception):
    """Raised by the hook on the first block: everything after it is not needed."""


@dataclass
class BlockInputs:
    """What the first block receives: hidden states per sample and the shared extra arguments.

    Attributes:
        hidden (`list[torch.Tensor]`): one ``[1, L, H]`` tensor per sample (on the cache device).
        args (`tuple`): further positional arguments (GPT-2 passes the cache and the mask positionally).
        kwargs (`dict`): keyword arguments: attention mask, position ids, transformers 5.x ``position_embeddings``.
    """

    hidden: list[torch.Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding most ``PoTLinear`` layers (``model.layers``, ``transformer.h``, ...).

    Raises:
        ValueError: the model has no ``PoTLinear`` inside a ``ModuleList`` (not quantised, or not a block model).
    """
    best, best_count = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            count = sum(isinstance(x, PoTLinear) for x in m.modules())
            if count > best_count:
                best, best_count = (name, m), count
    if best is None:
        raise ValueError(
            "PoT calibration found no PoTLinear layers inside a list of blocks (nn.ModuleList); quantise the model "
            "first (optimum_pot.quantize or from_pretrained with a PoTConfig) and use a decoder model with layers."
        )
    return best


def _to(obj, device, dtype: torch.dtype | None = None):
    """Moves tensors (also inside tuples) to ``device`` (floating ones to ``dtype`` too); leaves the rest alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, samples: torch.Tensor, cache_device) -> BlockInputs:
    """Runs ``model`` on each sample ``[S, L]`` up to ``first_block`` and records its inputs.

    The positional/keyword extras (masks, rotary ``position_embeddings``) are the same for every sample of the
    same length, so the first sample's are kept.
    """
    caught = BlockInputs(hidden=[])

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.hidden.append(hidden.detach().to(cache_device))
        if len(caught.hidden) == 1:
            caught.args = tuple(_to(a, "cpu") for a in args[1:])
            caught.kwargs = {k: _to(v, "cpu") for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}
        raise _Caught

    device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in samples:
            try:
                model(input_ids=row[None].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    # GPT-2 passes past_key_values positionally: a cache must not leak into the block calls.
    caught.args = tuple(None if not isinstance(a, torch.Tensor | tuple) else a for a in caught.args)
    return caught


def block_device(block: nn.Module) -> torch.device:
    """Where ``block`` runs: its first parameter's device, else its first buffer's (a working copy may hold only
    buffers)."""
    ref = next(iter(block.parameters()), None)
    return (ref if ref is not None else next(iter(block.buffers()))).device


def block_output(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> torch.Tensor:
    """Calls ``block`` on ``hidden`` ``[B, L, H]`` with the captured extras (cast to ``hidden``'s device and dtype)."""
    hidden = hidden.to(block_device(block))
    dev, dt = hidden.device, hidden.dtype
    # The extras were caught for one sample; masks and positions broadcast over a batch of samples.
    out = block(hidden, *_to(inputs.args, dev, dt), **{k: _to(v, dev, dt) for k, v in inputs.kwargs.items()})
    return out[0] if isinstance(out, tuple | list) else out
