"""The level set and step-1 scale search: pure functions checked against brute force."""

import pytest
import torch

from optimum_pot.format.levels import (
    decode,
    encode,
    expand_groups,
    fake_quantize,
    group_absmax,
    max_nonzero_exponent,
    num_exponent_codes,
    unit_values,
)
from optimum_pot.format.scale_search import search_scales, weight_error

BITS = [2, 3, 4]
ZERO = [pytest.param(True, id="zero"), pytest.param(False, id="nozero")]


def grid(bits: int, zero_level: bool) -> torch.Tensor:
    """Every representable unit value, enumerated from the definition."""
    mags = [2.0**-e for e in range(max_nonzero_exponent(bits, zero_level) + 1)]
    if zero_level:
        mags.append(0.0)
    return torch.tensor(sorted({s * m for m in mags for s in (1.0, -1.0)}))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero_level", ZERO)
def test_encode_picks_nearest_grid_point(bits, zero_level):
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)
    s = w.abs().amax(dim=1, keepdim=True).expand_as(w) * 0.8
    q = decode(encode(w, s, bits, zero_level), s, bits, zero_level)
    levels = grid(bits, zero_level)
    brute = (levels[None, None, :] * s[..., None] - w[..., None]).abs().min(-1).values
    torch.testing.assert_close((q - w).abs(), brute, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero_level", ZERO)
def test_every_code_decodes_to_its_definition(bits, zero_level):
    codes = torch.arange(1 << bits, dtype=torch.uint8)
    vals = unit_values(codes, bits, zero_level)
    for c, v in zip(codes.tolist(), vals.tolist()):
        sign = -1.0 if c >> (bits - 1) else 1.0
        e = c & (num_exponent_codes(bits) - 1)
        is_zero = zero_level and e == num_exponent_codes(bits) - 1
        assert v == (0.0 if is_zero else sign * 2.0**-e)


def test_zero_scale_group_decodes_to_zero():
    w = torch.zeros(2, 8)
    s = torch.zeros(2, 8)
    assert torch.equal(decode(encode(w, s, 3, False), s, 3, False), torch.zeros(2, 8))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [16, 50, 128], ids=lambda g: f"g{g}")
def test_search_never_worse_than_closed_form(bits, group_size):
    torch.manual_seed(1)
    w = torch.randn(32, 200)
    closed = search_scales(w, group_size, bits, True, grid_points=1)
    searched = search_scales(w, group_size, bits, True, grid_points=32)
    e_closed = weight_error(w, closed, group_size, bits, True)
    e_search = weight_error(w, searched, group_size, bits, True)
    assert (e_search <= e_closed + 1e-6).all()
    assert e_search.sum() < 0.95 * e_closed.sum()  # the search must actually help on Gaussian weights
    assert torch.equal(searched, searched.half().float())  # representable in the stored dtype


def test_importance_weighting_shifts_the_error():
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    imp = torch.ones(64)
    imp[:8] = 100.0
    plain = search_scales(w, 64, 3, True)
    weighted = search_scales(w, 64, 3, True, importance=imp)
    err = lambda s: ((w - decode(encode(w, s.expand(-1, 64), 3, True), s.expand(-1, 64), 3, True))[:, :8] ** 2).sum()
    assert err(weighted) <= err(plain)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_matches_decode_and_passes_gradients(bits):
    torch.manual_seed(3)
    w = torch.randn(8, 40, requires_grad=True)
    scale = search_scales(w.detach(), 16, bits, True).requires_grad_(True)
    q = fake_quantize(w, scale, 16, bits, True)
    s_full = expand_groups(scale.detach(), 16, 40)
    torch.testing.assert_close(q.detach(), decode(encode(w.detach(), s_full, bits, True), s_full, bits, True))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero_level", ZERO)
def test_search_picks_the_best_candidate_by_weight_error(bits, zero_level):
    """The fast search (log computed once) agrees with the reference error on which candidate wins."""
    torch.manual_seed(4)
    w = torch.randn(24, 90) * torch.rand(24, 1)
    searched = search_scales(w, 32, bits, zero_level, grid_points=8)
    absmax = group_absmax(w, 32)
    cands = [(absmax * a).half().float() for a in torch.linspace(0.5, 1.0, 8).tolist()]
    errs = torch.stack([weight_error(w, c, 32, bits, zero_level) for c in cands])  # [C, N, G]
    best = errs.min(dim=0).values
    torch.testing.assert_close(weight_error(w, searched, 32, bits, zero_level), best, rtol=1e-5, atol=1e-9)
