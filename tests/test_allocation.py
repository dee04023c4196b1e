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
