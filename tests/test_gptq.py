"""Error-feedback rounding (``calibration/gptq.py``, ``hessian.py``) on every level set: pure functions, no model."""

import warnings

import pytest
import torch

from optimum_pot import PoTConfig
from optimum_pot.calibration.gptq import gptq_round, on_grid, relative_error
from optimum_pot.calibration.hessian import Hessian, inverse_cholesky
from optimum_pot.format.groups import expand_groups
from optimum_pot.format.scale_search import search_scales
from optimum_pot.format.weights import dequantize_weight, quantize_weight

from .level_sets import ALL_LEVEL_SETS, ids

N, K, GS = 24, 80, 32  # 80 columns: a partial last group


def correlated_inputs(seed=0, rows=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)
    return (torch.randn(rows, K, generator=g) @ mix) * torch.rand(K, generator=g) * 3  # [T, K]


def hessian_of(x):
    acc = Hessian(K)
    for chunk in x.split(100):  # accumulated in pieces: the running mean must equal the one-shot one
        acc.add(chunk)
    return acc.h


def weight(seed=1):
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def nearest(w, ls, scale, offset):
    z = None if offset is None else expand_groups(offset, GS, K)
    return on_grid(w, expand_groups(scale, GS, K), z, ls)


def test_hessian_running_mean():
    x = correlated_inputs()
    assert torch.allclose(hessian_of(x), x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS, ids=ids)
def test_error_feedback_beats_nearest_and_stays_on_grid(ls):
    w, h = weight(), hessian_of(correlated_inputs())
    scale, offset = search_scales(w, ls, GS)
    base = relative_error(w, nearest(w, ls, scale, offset), h)
    r = gptq_round(w, h, ls, GS, scale, offset, act_order=False, block_size=16)
    assert r.feedback and r.error < base
    assert torch.equal(r.scale, scale)  # static grid kept
    # Every value is a grid point: packing re-derives the same codes, and decoding gives the same weight bit-exact.
    packed, s16, z16 = quantize_weight(r.weight, ls, GS, scale=r.scale, offset=r.offset)
    assert torch.equal(dequantize_weight(packed, s16, z16, ls, GS, K), r.weight)


@pytest.mark.parametrize("ls", ALL_LEVEL_SETS[::3], ids=ids)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_dynamic_group_scales(ls, act_order):
    """Scales searched as each group is reached (with act order: groups reached out of column order)."""
    w, h = weight(), hessian_of(correlated_inputs())
    scale, offset = search_scales(w, ls, GS)
    r = gptq_round(w, h, ls, GS, None, None, act_order=act_order, block_size=16, weighted_search=True)
    assert r.error < relative_error(w, nearest(w, ls, scale, offset), h)
    assert torch.isfinite(r.scale).all() and torch.equal(r.scale, r.scale.half().float())
    packed, s16, z16 = quantize_weight(r.weight, ls, GS, scale=r.scale, offset=r.offset)
    assert torch.equal(dequantize_weight(packed, s16, z16, ls, GS, K), r.weight)


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_lazy_batches_do_not_change_the_result(block_size):
    """Lazy batch updates only reorder arithmetic: any block size gives (nearly) the same rounding."""
    ls = ALL_LEVEL_SETS[0]
    w, h = weight(), hessian_of(correlated_inputs())
    scale, offset = search_scales(w, ls, GS)
    ref = gptq_round(w, h, ls, GS, scale, offset, act_order=True, block_size=K)
    r = gptq_round(w, h, ls, GS, scale, offset, act_order=True, block_size=block_size)
    assert (r.weight != ref.weight).float().mean() < 0.01


def test_diagonal_hessian_is_nearest_rounding():
    """Uncorrelated inputs: no error can be compensated, error feedback is exactly nearest rounding."""
    ls = ALL_LEVEL_SETS[-1]
    w, h = weight(), torch.diag(torch.rand(K) + 0.1)
    scale, offset = search_scales(w, ls, GS)
    r = gptq_round(w, h, ls, GS, scale, offset, act_order=True)
    assert torch.equal(r.weight, nearest(w, ls, scale, offset))


def test_not_positive_definite_retries_with_more_damping():
    h = torch.eye(K)
    h[0, 1] = h[1, 0] = 1.05  # eigenvalue -0.05: negative with 1 % damping, positive with 10 %
    with pytest.warns(RuntimeWarning, match="not positive definite.*used 0.1"):
        assert inverse_cholesky(h, 0.01) is not None
    ls = ALL_LEVEL_SETS[0]
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        r = gptq_round(weight(), h, ls, GS, None, None)
    assert r.feedback and torch.isfinite(r.weight).all() and torch.isfinite(r.scale).all()


def test_unusable_hessian_rounds_to_nearest_without_nan():
    ls = ALL_LEVEL_SETS[0]
    h = torch.full((K, K), float("nan"))
    with pytest.warns(RuntimeWarning, match="not finite"):
        r = gptq_round(weight(), h, ls, GS, None, None)
    assert not r.feedback and torch.isfinite(r.weight).all() and torch.isfinite(r.scale).all()
    h = -torch.ones(K, K) * 1e3 + torch.eye(K)  # stays indefinite at every damping tried
    with pytest.warns(RuntimeWarning, match="stayed singular"):
        assert inverse_cholesky(h, 0.01) is None


def test_dead_inputs_do_not_produce_nan():
    """Inputs that never fire (zero rows/columns of H) are left to nearest rounding, not divided by zero."""
    x = correlated_inputs()
    x[:, :10] = 0
    ls = ALL_LEVEL_SETS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dead input is normal, not worth a warning
        r = gptq_round(weight(), hessian_of(x), ls, GS, None, None)
    assert torch.isfinite(r.weight).all()


@pytest.mark.parametrize("damp", [0, -0.1, "0.01", True, float("inf"), float("nan")])
def test_non_positive_damping_raises(damp):
    with pytest.raises(ValueError, match="damp_percent must be a finite number > 0"):
        inverse_cholesky(torch.eye(4), damp)
    with pytest.raises(ValueError, match="damp_percent"):
        PoTConfig(damp_percent=damp)
