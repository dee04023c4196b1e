"""Per-layer bit allocation under a budget (``calibration/allocation.py``): the solver, the config, a tiny model."""

import pytest
import torch

from optimum_pot import PoTConfig, PoTLinear, quantize
from optimum_pot.calibration.allocation import choose_bits, stored_bits

from .conftest import WIKITEXT_VALID, byte_tokenizer, make_tiny_llama


def synthetic_errors(n_layers=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n_layers, generator=g) * 10 + 0.1  # sensitivities spread over two orders of magnitude
    errors = {f"l{i}": {b: base[i].item() * 4.0**-b for b in (2, 3, 4)} for i in range(n_layers)}
    sizes = {f"l{i}": int(s) for i, s in enumerate(torch.randint(100, 1000, (n_layers,), generator=g))}
    return errors, sizes


def average_bits(bits, sizes):
    return sum(sizes[m] * b for m, b in bits.items()) / sum(sizes.values())


@pytest.mark.parametrize("budget", [2.0, 2.5, 3.0, 3.5, 4.0])
def test_choice_respects_budget(budget):
    errors, sizes = synthetic_errors()
    bits = choose_bits(errors, sizes, budget)
    assert set(bits) == set(errors) and all(b in (2, 3, 4) for b in bits.values())
    assert average_bits(bits, sizes) <= budget + 1e-9
    assert budget - average_bits(bits, sizes) < 1.0  # spends most of it (one layer's step at most unspent)


def test_choice_extremes_and_monotone():
    errors, sizes = synthetic_errors()
    assert set(choose_bits(errors, sizes, 2.0).values()) == {2}
    assert set(choose_bits(errors, sizes, 4.0).values()) == {4}
    total = [sum(errors[m][b] for m, b in choose_bits(errors, sizes, x).items()) for x in (2.5, 3.0, 3.5)]
    assert total[0] > total[1] > total[2]


def test_choice_prefers_sensitive_layers():
    """At equal size, the layer whose error falls most per bit gets the bits."""
    errors = {"robust": {2: 1.0, 3: 0.9, 4: 0.8}, "sensitive": {2: 50.0, 3: 5.0, 4: 1.0}}
    assert choose_bits(errors, {"robust": 100, "sensitive": 100}, 3.0) == {"robust": 2, "sensitive": 4}


def test_stored_bits_counts_codes_scales_offsets():
    # 8 rows × 70 columns: codes padded to 72 per row; 3 groups of 32 per row, float16 scale (+ offset).
    assert stored_bits(8, 70, 3, 32, offset=False) == 8 * 72 * 3 + 8 * 3 * 16
    assert stored_bits(8, 70, 3, 32, offset=True) == 8 * 72 * 3 + 8 * 3 * 32


@pytest.mark.parametrize("budget", [1.5, 4.5, "3", True])
def test_budget_outside_supported_bits_raises(budget):
    with pytest.raises(ValueError, match=r"bit_budget must be .* between .*\(2 and 4\)"):
        PoTConfig(bit_budget=budget)


def test_allocation_on_tiny_llama_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        texts = [p for p in f.read(40_000).split("\n\n") if p.strip()]
    cfg = PoTConfig(bits=4, group_size=32, bit_budget=3.0, tokenizer=byte_tokenizer(), num_samples=4, seq_len=64)
    model = quantize(make_tiny_llama(), cfg, texts)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PoTLinear)}
    assert set(cfg.module_bits) == set(layers)  # full module names, every block layer
    assert all(layers[n].bits == b for n, b in cfg.module_bits.items())
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    assert average_bits(cfg.module_bits, sizes) <= 3.0 and len(set(cfg.module_bits.values())) > 1
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.module_bits == cfg.module_bits
    state, loaded = model.state_dict(), again.state_dict()
    assert state.keys() == loaded.keys() and all(torch.equal(state[k], loaded[k]) for k in state)


def test_sensitivity_predicts_the_measured_loss_increase():
    """The K-FAC estimate ``Σ_i G_i (Δ H Δᵀ)_ii`` ranks the tiny Llama's layers like the loss increase measured by
    quantising each layer alone at 2 bits (rank correlation), which is what the allocation relies on."""
    from optimum_pot.calibration import calibration_samples, find_blocks
    from optimum_pot.calibration.allocation import _level_set, layer_sensitivity, output_gradients
    from optimum_pot.calibration.blocks import capture_inputs
    from optimum_pot.calibration.sequential import pot_modules
    from optimum_pot.calibration.weights import FloatWeights
    from optimum_pot.format.weights import quantize_weight

    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        texts = [p for p in f.read(40_000).split("\n\n") if p.strip()]
    tok, cfg = byte_tokenizer(), PoTConfig(bits=2, group_size=32, grid_points=8)
    ids = calibration_samples(texts, tok, 8, 64)  # [8, 64]
    float_model = make_tiny_llama().eval()
    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=32))  # near-float stand-in, as in calibration
    for name, m in float_model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"):
            model.get_submodule(name)._float_weight = m.weight.detach()
    prefix, blocks = find_blocks(model)
    with torch.no_grad():
        inputs = capture_inputs(model, blocks[0], ids, torch.device("cpu"))
    hidden = [h.float() for h in inputs.hidden]
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in pot_modules(b)]
    grads = output_gradients(model, ids, names)
    assert set(grads) == set(names) and all(g.shape == (model.get_submodule(n).out_features,) and g.sum() > 0
                                            for n, g in grads.items())  # fmt: skip
    errors, _ = layer_sensitivity(prefix, blocks, FloatWeights(model), inputs, hidden, grads, cfg, False)

    def loss(m):
        with torch.no_grad():
            return sum(m(input_ids=x[None], labels=x[None]).loss.item() for x in ids) / len(ids)

    base, measured = loss(float_model), {}
    for n in names:
        layer = float_model.get_submodule(n)
        w = layer.weight.data.clone()
        packed, s, z = quantize_weight(w, _level_set(cfg, 2), 32, 8, None)
        q = PoTLinear(layer.in_features, layer.out_features, False, _level_set(cfg, 2), 32)
        q.set_quantized(packed, s, z)
        layer.weight.data = q.dequantize_weight(torch.float32)
        measured[n] = loss(float_model) - base
        layer.weight.data = w
    rank = lambda v: torch.tensor(v).argsort().argsort().float()  # noqa: E731
    predicted, actual = rank([errors[n][2] for n in names]), rank([measured[n] for n in names])
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] > 0.5


def test_output_gradients_without_a_loss_fall_back_and_restore_the_model():
    """A model that returns no loss for ``labels`` gives ``None`` (the allocation then ranks by relative error),
    and the parameters that were trainable are trainable again."""
    from types import SimpleNamespace

    from optimum_pot.calibration.allocation import output_gradients

    model = quantize(make_tiny_llama(), PoTConfig(bits=4, group_size=32))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [n for n, m in model.named_modules() if isinstance(m, PoTLinear)]
    ids = torch.randint(0, 200, (2, 16))
    assert set(output_gradients(model, ids, names)) == set(names)
    model.forward = lambda *a, **k: SimpleNamespace(loss=None, logits=None)
    assert output_gradients(model, ids, names) is None
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
