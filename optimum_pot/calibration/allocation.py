"""Per-layer bit allocation under an average bit budget (``PoTConfig(bit_budget=...)``).

Sensitivity: the loss increase each layer would cause at each candidate width ``b``, estimated in the Kronecker
(K-FAC) form of the loss curvature: ``ΔL_m(b) ≈ ½ Σ_i G_i · (Δ H Δᵀ)_ii`` with ``Δ`` the layer's rounding error
(nearest level on a searched grid), ``H`` the mean outer product of its inputs (one pass of the model over a few
calibration samples, block by block) and ``G_i`` the mean squared gradient of the language-model loss with respect
to output channel ``i`` (one backward pass of the calibration-free model over the same samples). Unlike a layer's
relative output error, this puts every layer in the same unit (loss), so a layer whose error the rest of the network
amplifies gets its bits first (SmolLM2, budget 3.5: 30.66 vs 30.86 ranked by relative error; docs/calibration.md).
Choice: start every layer at the smallest width and repeatedly widen the layer with the largest loss drop per extra
stored bit while the budget allows (greedy on the marginal gains; the errors fall steeply and convexly with bits).
The budget counts code bits (what ``bits`` means); the report also gives what the checkpoint really stores per
weight, scales and offsets included.
"""

import logging

import torch
from tqdm.auto import tqdm

from ..format.groups import expand_groups, num_groups
from ..format.packing import packed_row_bytes
from ..format.registry import get_family, get_level_set
from ..format.scale_search import search_scales
from ..format.weights import quantize_weight
from ..nn.pot_linear import PoTLinear
from .gptq import on_grid, relative_error, single_thread
from .sequential import find_stages, pot_modules, stage_hessians, work_block

logger = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 8  # samples of the sensitivity pass (its Hessians only rank layers)
SENSITIVITY_GRID = 4  # scale-search candidates of the sensitivity pass (a ranking needs no fine search)


def stored_bits(out_features: int, in_features: int, bits: int, group_size: int, offset: bool) -> int:
    """Bits the checkpoint stores for one layer: packed codes (rows padded to 8 codes), float16 scales, offsets."""
    groups = out_features * num_groups(in_features, group_size)
    return out_features * packed_row_bytes(in_features, bits) * 8 + groups * 16 * (2 if offset else 1)


def choose_bits(errors: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Per-layer bits minimising ``Σ r_m(b_m)`` subject to ``Σ n_m b_m ≤ budget · Σ n_m`` (greedy on marginal gains).

    Args:
        errors: per layer, the relative error of each candidate width.
        sizes: per layer, its number of weights ``n_m``.
        budget (`float`): average code bits per weight.
    """
    bits = {m: min(e) for m, e in errors.items()}
    spare = budget * sum(sizes.values()) - sum(sizes[m] * b for m, b in bits.items())
    while True:
        best, gain = None, 0.0
        for m, e in errors.items():
            wider = [b for b in e if b > bits[m]]
            if not wider:
                continue
            nb = min(wider)
            cost = sizes[m] * (nb - bits[m])
            g = (e[bits[m]] - e[nb]) / cost
            if cost <= spare + 1e-6 and g > gain:
                best, gain = (m, nb, cost), g
        if best is None:
            return bits
        m, nb, cost = best
        bits[m], spare = nb, spare - cost


def output_gradients(model, samples: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor] | None:
    """``{name: G [N]}``: the squared gradient of the causal-LM loss with respect to each output channel of the
    named layers, summed over tokens and samples (one forward and backward per sample ``[L]`` of ``samples``).

    Runs the model as it is (its layers quantised calibration-free), with the parameters frozen: only the
    activations carry gradients, which start at the output of the input embeddings. `None` for a model whose
    forward returns no loss for ``labels`` (not a causal LM).
    """
    acc: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, out):
            def grad_hook(g):
                sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)  # [N]
                acc[name] = sq if name not in acc else acc[name] + sq

            if out.requires_grad:
                out.register_hook(grad_hook)

        return hook

    emb = model.get_input_embeddings()
    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    handles.append(emb.register_forward_hook(lambda m, a, out: out.detach().requires_grad_()))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for ids in samples[:SENSITIVITY_SAMPLES]:
                ids = ids[None].to(device)  # [1, L]
                loss = getattr(model(input_ids=ids, labels=ids, use_cache=False), "loss", None)
                if loss is None:
                    return None
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
    return acc


@torch.no_grad()
def layer_sensitivity(prefix, blocks, weights, inputs, hidden, grads, cfg, progress) -> tuple[dict, dict]:
    """``(errors, sizes)``: the estimated loss increase of every layer at every width of the family, and its size."""
    widths = get_family(cfg.levels).bits
    errors, sizes = {}, {}
    xs = [h.float() for h in hidden[:SENSITIVITY_SAMPLES]]
    for i, block in enumerate(tqdm(blocks, desc="bit allocation", unit="block", disable=not progress)):
        mods = dict(pot_modules(block))
        w = {n: weights.get(f"{prefix}.{i}.{n}", m).to(m.weight.device) for n, m in mods.items()}
        wb = work_block(block, w)
        stages = find_stages(wb, list(mods), xs[0], inputs)
        acc, xs = stage_hessians(wb, [s[0] for s in stages], xs, inputs, stop=False)  # xs: the next block's inputs
        for stage in stages:
            hess = acc.get(stage[0])
            for n in stage:
                m, full = mods[n], f"{prefix}.{i}.{n}"
                sizes[full] = m.out_features * m.in_features
                g = None if grads is None else grads.get(full)
                with single_thread():
                    errors[full] = {b: _error(w[n], hess, g, _level_set(cfg, b), m.group_size, grads is not None)
                                    for b in widths}  # fmt: skip
        del wb, w
    return errors, sizes


def _level_set(cfg, bits: int):
    return get_level_set(cfg.levels, bits, cfg.zero_level, cfg.offset)


def _error(w, hess, grad_sq, ls, group_size, weighted: bool) -> float:
    """``Σ_i G_i (Δ H Δᵀ)_ii``; a layer the loss never reached (no ``H`` or no ``G``) costs nothing at any width.
    Without gradients (``weighted=False``), the relative output error ``tr(Δ H Δᵀ) / tr(W H Wᵀ)``."""
    if weighted and (hess is None or grad_sq is None):
        return 0.0
    s, z = search_scales(w, ls, group_size, SENSITIVITY_GRID, None, 1)
    k = w.shape[1]
    q = on_grid(w, expand_groups(s, group_size, k), None if z is None else expand_groups(z, group_size, k), ls)
    if not weighted:
        return relative_error(w, q, hess.h if hess is not None else torch.eye(k))
    d = q - w
    return (grad_sq.to(d.device) * ((d @ hess.h) * d).sum(1)).sum().item()  # rows [N] of Δ H Δᵀ, weighted


def allocate_bits(model, prefix, blocks, weights, inputs, hidden, samples, cfg, progress=True) -> dict:
    """Chooses every block layer's bits for ``cfg.bit_budget``, writes them into ``cfg.module_bits`` (full names)
    and re-creates the layers whose width changes (calibration-free at first). Returns what was spent.

    ``samples`` ``[S, L]`` are the calibration token ids (the gradients), ``hidden`` their first block inputs.
    """
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in pot_modules(b)]
    grads = output_gradients(model, samples, names)
    if grads is None:
        logger.warning("bit allocation: the model returns no loss for labels; layers ranked by relative output error")
    errors, sizes = layer_sensitivity(prefix, blocks, weights, inputs, hidden, grads, cfg, progress)
    bits = choose_bits(errors, sizes, cfg.bit_budget)
    cfg.module_bits = {**(cfg.module_bits or {}), **bits}
    for name, b in bits.items():
        module = model.get_submodule(name)
        if module.bits != b:
            _rewidth(model, name, module, cfg, weights)
    stored = {n: stored_bits(*_shape(model.get_submodule(n)), b, model.get_submodule(n).group_size,
                             model.get_submodule(n).level_set.offset) for n, b in bits.items()}  # fmt: skip
    total = sum(sizes.values())
    spent = {
        "budget": cfg.bit_budget,
        "code_bits": sum(sizes[n] * b for n, b in bits.items()) / total,
        "stored_bits": sum(stored.values()) / total,
        "layers_per_bits": {b: sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
        "module_bits": bits,
    }
    logger.info("bit allocation: %.3f code bits/weight (%.3f stored with scales/offsets) for a budget of %.3f",
                spent["code_bits"], spent["stored_bits"], cfg.bit_budget)  # fmt: skip
    return spent


def _shape(m: PoTLinear) -> tuple[int, int]:
    return m.out_features, m.in_features


def _rewidth(model, name: str, old: PoTLinear, cfg, weights) -> None:
    """Replaces ``old`` by a ``PoTLinear`` of ``cfg``'s level set for ``name``, quantised calibration-free."""
    from .weights import FLOAT_ATTR

    ls = cfg.level_set_for(name)
    new = PoTLinear(old.in_features, old.out_features, old.bias is not None, ls, old.group_size, old.backend,
                    old.from_conv1d, bias_dtype=None if old.bias is None else old.bias.dtype,
                    device=old.weight.device)  # fmt: skip
    w = weights.get(name, old)
    new.set_quantized(*quantize_weight(w, ls, new.group_size, cfg.grid_points, cfg.refine_steps, name=name))
    if old.bias is not None:
        new.bias.data = old.bias.detach().clone()
    if hasattr(old, FLOAT_ATTR):
        setattr(new, FLOAT_ATTR, getattr(old, FLOAT_ATTR))
    model.set_submodule(name, new)
