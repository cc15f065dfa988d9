"""countdown.budget: bytes per decode step, TEAL's block-wise greedy and the sensitivity knapsack."""

from __future__ import annotations

import pytest

import countdown
from countdown import budget
from countdown.models import attention_sites, ffn_sites
from tests.tiny_models import tiny_model, tokens

WINDOWS = tokens(2, 16)


def _bytes(t):
    return t.numel() * t.element_size()


def test_byte_model_counts_the_dense_step_and_each_sites_rows():
    model = tiny_model("llama")
    dense = sum(_bytes(p) for p in model.parameters()) - _bytes(model.get_input_embeddings().weight)
    ffn = sum(_bytes(m.weight) for s in ffn_sites(model) for m in s.modules.values())
    attn = sum(_bytes(p.weight) for s in attention_sites(model) for p in (*s.qkv, s.o))
    teal = budget.byte_model(model, "teal", attention=True)
    assert teal.dense == dense and teal.sites == ("input", "coef", "qkv", "o")
    assert teal.fraction(teal.uniform_at(0.5)) == pytest.approx((dense - 0.5 * (ffn + attn)) / dense)
    mcd = budget.byte_model(model, "m-countdown")  # up dense: gate rows and down columns of kept neurons
    assert mcd.fraction(mcd.uniform_at(0.5)) == pytest.approx((dense - 0.5 * 2 / 3 * ffn) / dense)
    assert mcd.fraction(mcd.uniform(0.8)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="out of reach"):
        mcd.uniform(0.1)


def test_knapsack_spends_bytes_where_kl_per_byte_is_least_and_lands_on_the_budget():
    bm = budget.ByteModel(dense=100.0, sites=("coef",), rate=((10.0,), (10.0,)))
    # layer 0 is cheap, layer 1 dear; layer 1's curve is not convex (its hull skips the 0.5 point)
    profile = budget.Profile(("coef",), (0.5, 0.9), (((0.01, 0.02),), ((0.5, 0.6),)))
    alloc = budget.knapsack_allocation(profile, bm, 0.9)  # save 10 bytes: layer 0 alone, 0 -> 0.9 then layer 1
    assert bm.fraction(alloc) == pytest.approx(0.9)
    assert alloc.values[0][0] == pytest.approx(0.9) and alloc.values[1][0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="out of reach"):
        budget.knapsack_allocation(profile, bm, 0.5)


def test_greedy_keeps_each_blocks_bytes_and_is_deterministic():
    model = tiny_model("llama")
    bm = budget.byte_model(model, "teal", attention=True)
    a = budget.greedy_allocation(model, "teal", 0.8, WINDOWS, attention=True, step=0.05)
    assert not countdown.is_sparsified(model)  # searched on a probe, left dense
    uniform = bm.uniform(0.8)
    for rates, row, urow in zip(bm.rate, a.values, uniform.values):
        assert sum(r * s for r, s in zip(rates, row)) == pytest.approx(sum(r * s for r, s in zip(rates, urow)))
    assert a != uniform and bm.fraction(a) == pytest.approx(0.8)
    assert budget.greedy_allocation(model, "teal", 0.8, WINDOWS, attention=True, step=0.05) == a
    # one site per block: nothing to choose
    assert budget.greedy_allocation(model, "m-countdown", 0.8, WINDOWS) == budget.byte_model(model, "m-countdown").uniform(0.8)


def test_sensitivity_profile_and_allocation_on_a_model():
    model = tiny_model("llama")
    profile = budget.sensitivity_profile(model, "wina", WINDOWS, grid=(0.3, 0.9))
    assert not countdown.is_sparsified(model)
    for layer in profile.kl:
        for curve in layer:
            assert 0 <= curve[0] < curve[1]  # more skipped, further from the dense model
    bm = budget.byte_model(model, "wina")
    alloc = budget.knapsack_allocation(profile, bm, 0.8)
    assert bm.fraction(alloc) == pytest.approx(0.8)
    again = budget.sensitivity_allocation(model, "wina", 0.8, WINDOWS, grid=(0.3, 0.9))
    assert again == alloc
    countdown.sparsify(model, "wina", alloc, calibration=WINDOWS, progress=False, kernels="off")
    assert countdown.sparsity_spec(model).allocation == alloc
    countdown.unsparsify(model)
    with pytest.raises(ValueError, match="unknown search"):
        budget.search(model, "wina", 0.8, WINDOWS, "annealing")
