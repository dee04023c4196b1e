"""The format object and the pure quantisation math, checked against brute force."""

import pytest
import torch

import optimum_pot.format.families as fam
from optimum_pot.format.groups import expand_groups
from optimum_pot.format.level_set import LevelSet, power_terms
from optimum_pot.format.levels import decode, encode, fake_quantize, nearest_levels, unit_values
from optimum_pot.format.registry import families, from_id, get_level_set
from optimum_pot.format.scale_search import search_scales, weight_error
from optimum_pot.format.weights import dequantize_weight, quantize_weight

from .level_sets import ALL_LEVEL_SETS, ids


def test_power_terms_are_minimal_and_exact():
    assert power_terms(7.0) == ((1, 3), (-1, 0))  # 8 - 1
    assert power_terms(-0.75) == ((-1, 0), (1, -2))  # -1 + 1/4
    assert power_terms(0.0) == ()
    for v in [x / 8 for x in range(-128, 129)]:
        assert sum(s * 2.0**e for s, e in power_terms(v)) == v
    assert len(power_terms(0.3)) > 2  # a binary float, but far from two terms
    with pytest.raises(ValueError, match="not finite"):
        power_terms(float("inf"))


def test_level_set_rejects_bad_tables():
    with pytest.raises(ValueError, match="needs 16 values"):
        LevelSet("x", 4, (0.0, 1.0))
    with pytest.raises(ValueError, match="more than 2 powers of two"):
        LevelSet("x", 2, (-11.0, 0.0, 1.0, 2.0))  # 11 = 8 + 2 + 1
    with pytest.raises(ValueError, match="more than 2 powers of two"):
        LevelSet("x", 2, (-0.3, 0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="bits must be one of"):
        LevelSet("x", 5, tuple(range(32)))


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_every_level_is_at_most_two_powers_of_two(ls):
    for value, terms in zip(ls.values, ls.terms):
        assert len(terms) <= 2 and sum(s * 2.0**e for s, e in terms) == value
    assert from_id(ls.id) == ls


def test_pot_table_is_format_version_1():
    """Version-1 codes: sign in the top bit, exponent below, all-ones exponent = 0 with the zero level."""
    for bits in (2, 3, 4):
        for zero in (True, False):
            ls = get_level_set("pot", bits, zero_level=zero)
            n_e = 1 << (bits - 1)
            for code, v in enumerate(ls.values):
                e, sign = code & (n_e - 1), code >> (bits - 1)
                expected = 0.0 if zero and e == n_e - 1 else (-1) ** sign * 2.0**-e
                assert v == expected


def test_registry_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"Unknown PoT level set 'nf4'; choose one of \['int', 'pot', 'sp2'\]"):
        get_level_set("nf4", 4)
    with pytest.raises(ValueError, match="exists at bits"):
        get_level_set("pot", 5)
    with pytest.raises(ValueError, match="no variant without a zero level"):
        get_level_set("sp2", 4, zero_level=False)
    with pytest.raises(ValueError, match="Upgrade optimum_pot"):
        from_id("fancy:4")
    with pytest.raises(ValueError, match="Malformed"):
        from_id("pot")
    assert set(families()) >= {"pot", "sp2", "int"}


def test_registering_a_family_is_one_call():
    family = fam.Family("test3", lambda bits, zero: tuple(float(v) for v in range(-4, 4)), (3,), {3: True})
    fam.register_family(family)
    try:
        ls = get_level_set("test3", 3)
        assert ls.offset and ls.levels == tuple(float(v) for v in range(-4, 4))
        assert from_id("test3:3:offset") == ls
    finally:
        from optimum_pot.format.registry import _FAMILIES

        _FAMILIES.pop("test3")
        get_level_set.cache_clear()


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_encode_picks_the_nearest_level(ls):
    torch.manual_seed(0)
    w = torch.randn(32, 96) * torch.rand(32, 1)
    s = w.abs().amax(1, keepdim=True).expand_as(w) / ls.max_abs * 0.8
    z = (0.1 * s) if ls.offset else None
    q = decode(encode(w, s, z, ls), s, z, ls)
    grid = torch.tensor(ls.levels)[None, None, :] * s[..., None] + (0 if z is None else z[..., None])
    brute = (grid - w[..., None]).abs().min(-1).values
    torch.testing.assert_close((q - w).abs(), brute, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_nearest_level_ties_go_to_the_lower_level(ls):
    mids = torch.tensor(ls.midpoints)
    assert torch.equal(nearest_levels(mids, ls), torch.tensor(ls.levels[:-1]))
    assert torch.equal(nearest_levels(torch.tensor([-1e9, 1e9]), ls), torch.tensor([ls.levels[0], ls.levels[-1]]))


def test_zero_scale_group_decodes_to_zero():
    ls = get_level_set("pot", 3, zero_level=False)
    w, s = torch.zeros(2, 8), torch.zeros(2, 8)
    assert torch.equal(decode(encode(w, s, None, ls), s, None, ls), torch.zeros(2, 8))


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
@pytest.mark.parametrize("group_size", [16, 50], ids=lambda g: f"g{g}")
def test_search_and_refinement_never_worse_than_the_closed_form(ls, group_size):
    torch.manual_seed(1)
    w = torch.randn(32, 200)
    closed = search_scales(w, ls, group_size, grid_points=1, refine_steps=0)
    refined = search_scales(w, ls, group_size, grid_points=8, refine_steps=2)
    e_closed = weight_error(w, *closed, ls, group_size)
    e_refined = weight_error(w, *refined, ls, group_size)
    assert (e_refined <= e_closed * (1 + 1e-5) + 1e-9).all()
    assert e_refined.sum() < e_closed.sum()
    for t in refined:
        assert t is None or torch.equal(t, t.half().float())  # representable in the stored dtype


def test_importance_weighting_shifts_the_error():
    torch.manual_seed(2)
    ls = get_level_set("pot", 3)
    w = torch.randn(16, 64)
    imp = torch.ones(64)
    imp[:8] = 100.0
    plain = search_scales(w, ls, 64, 16)
    weighted = search_scales(w, ls, 64, 16, importance=imp)
    err = lambda sz: weight_error(w[:, :8], sz[0], None, ls, 64).sum()
    assert err(weighted) <= err(plain)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_fake_quantize_matches_decode_and_passes_gradients(ls):
    torch.manual_seed(3)
    w = torch.randn(8, 40, requires_grad=True)
    scale, offset = search_scales(w.detach(), ls, 16)
    scale.requires_grad_(True)
    if offset is not None:
        offset.requires_grad_(True)
    q = fake_quantize(w, scale, offset, 16, ls)
    s_full = expand_groups(scale.detach(), 16, 40)
    z_full = None if offset is None else expand_groups(offset.detach(), 16, 40)
    torch.testing.assert_close(q.detach(), decode(encode(w.detach(), s_full, z_full, ls), s_full, z_full, ls))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    if offset is not None:
        assert torch.equal(offset.grad, torch.full_like(offset, 16.0).index_fill_(1, torch.tensor([2]), 8.0))


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_quantize_weight_round_trips_through_dequantize(ls):
    torch.manual_seed(4)
    w = torch.randn(24, 72)
    packed, scale, offset = quantize_weight(w, ls, 32)
    assert packed.dtype == torch.uint8 and scale.dtype == torch.float16
    assert (offset is not None) == ls.offset
    q = dequantize_weight(packed, scale, offset, ls, 32, 72)
    # Re-quantising the decoded weight on the same grid is exact: every value is already a level.
    again = quantize_weight(q, ls, 32, scale=scale.float(), offset=None if offset is None else offset.float())
    assert torch.equal(dequantize_weight(*again, ls, 32, 72), q)


def test_unit_values_are_the_table():
    ls = get_level_set("sp2", 4)
    codes = torch.arange(16, dtype=torch.uint8)
    assert unit_values(codes, ls).tolist() == list(ls.values)
