"""Prefetch analysis: active sets, reuse curve and traffic model, on a tiny Llama and hand-made masks."""

from __future__ import annotations

import json

import pytest
import torch

import countdown
from countdown.methods import keep_count
from countdown.models import ffn_sites
from countdown.prefetch import (
    active_sets,
    analyse,
    plot_reuse,
    reuse_curve,
    summary_table,
    traffic_with_predictor,
)

from tiny_models import INTER, tiny_model, tokens


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _masks(rows: list[str]) -> torch.Tensor:
    """One window of hand-written active sets: "1100" = neurons 0 and 1 active."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


def test_active_sets_shapes_and_size(llama):
    windows = tokens(3, 20)
    masks = active_sets(llama, windows, 0.7)
    assert len(masks) == len(ffn_sites(llama))
    for m in masks:
        assert m.dtype == torch.bool and m.shape == (3, 20, INTER)
        assert (m.sum(-1) == keep_count(INTER, 0.7)).all()  # exactly (1 − s)·I per token


def test_active_sets_match_topk_of_coefficient(llama):
    """The mask is the top-k of |t| that the dense FFN input gives, per token and per window."""
    windows = tokens(2, 12)
    masks = active_sets(llama, windows, 0.5)
    site = ffn_sites(llama)[1]
    seen = []
    handle = site.input_module.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0]))
    with torch.no_grad():
        for w in windows:
            llama(input_ids=w[None], use_cache=False)
    handle.remove()
    for w, x in enumerate(seen):
        t = site.coefficient(x).abs()
        expected = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, t.topk(keep_count(INTER, 0.5), -1).indices, True)
        assert torch.equal(masks[1][w], expected)


def test_active_sets_leave_model_clean(llama):
    before = [tuple(s.input_module._forward_pre_hooks) for s in ffn_sites(llama)]
    active_sets(llama, tokens(1, 8), 0.5)
    assert [tuple(s.input_module._forward_pre_hooks) for s in ffn_sites(llama)] == before


def test_hit_rate_k1_hand_computed():
    a = _masks(["110000", "011000", "001110", "001110"])
    # n=1: A1={1,2}, A0={0,1} -> 1/2;  n=2: A2={2,3,4}, A1={1,2} -> 1/3;  n=3: A3=A2 -> 1
    out = reuse_curve([a], cache_sizes=(1,))
    assert out["hit_rate"][0][0] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)
    # occupancy = |A_{n-1}| / I averaged over n = 1..3: (2 + 2 + 3) / 3 / 6
    assert out["occupancy"][0][0] == pytest.approx((2 + 2 + 3) / 3 / 6)


def test_windows_are_not_bridged():
    # window 0 ends with A={0}; window 1 starts with A={0}: a bridged count would score a hit there
    a = _masks(["01", "01"])
    b = _masks(["10", "10"])
    both = torch.stack([torch.cat([b[:1], a[:1]]), torch.cat([a[:1], b[:1]])])  # [2, 2, 2]
    assert reuse_curve([both], (1,))["hit_rate"][0][0] == 0.0


def test_hit_rate_k2_and_same_positions():
    a = _masks(["1100", "0011", "1000", "0100"])
    # common positions n ≥ 2: n=2: A2={0}, cache k=1 {2,3} -> 0, k=2 {0,1,2,3} -> 1
    #                         n=3: A3={1}, k=1 {0} -> 0,   k=2 {0,2,3} -> 0
    out = reuse_curve([a], cache_sizes=(1, 2))
    assert out["hit_rate"][0] == pytest.approx([0.0, 0.5])
    # per-k positions n ≥ k: k=1 also counts n=1 (A1={2,3} vs A0={0,1} -> 0)
    assert reuse_curve([a], (1, 2), same_positions=False)["hit_rate"][0] == pytest.approx([0.0, 0.5])


def test_hit_rate_non_decreasing_in_k():
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(3, 40, 50, generator=g) < p for p in (0.1, 0.3, 0.5)]
    out = reuse_curve(masks, cache_sizes=(1, 2, 4, 8, 16))
    for hits, occ in zip(out["hit_rate"], out["occupancy"]):
        assert all(b >= a - 1e-12 for a, b in zip(hits, hits[1:]))
        assert all(b >= a - 1e-12 for a, b in zip(occ, occ[1:]))


def test_identical_consecutive_masks_hit_everything():
    a = _masks(["101100"] * 10)
    out = reuse_curve([a, a.unsqueeze(0).repeat(2, 1, 1)], cache_sizes=(1, 4))
    for hits in out["hit_rate"]:
        assert hits == pytest.approx([1.0, 1.0])
    assert out["occupancy"][0] == pytest.approx([0.5, 0.5])


def test_traffic_model():
    assert traffic_with_predictor(0.7) == pytest.approx(0.3)  # perfect predictor, no cache
    assert traffic_with_predictor(0.7, recall=0.8) == pytest.approx(0.3)  # top-k: same bytes, worse set
    # 0.3·0.8 true positives, half cached; 0.3·0.2 false positives, 40% cached
    assert traffic_with_predictor(0.7, 0.8, cache_hit=0.5, cache_occupancy=0.4) == pytest.approx(
        0.24 * 0.5 + 0.06 * 0.6)
    # a thresholded predictor with precision 0.5 fetches twice the neurons it finds
    assert traffic_with_predictor(0.5, recall=0.9, precision=0.5) == pytest.approx(0.9)
    assert traffic_with_predictor(0.5, predictor_fraction=0.05) == pytest.approx(0.55)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity_raises(llama, bad):
    with pytest.raises(ValueError, match="sparsity"):
        active_sets(llama, tokens(1, 8), bad)
    with pytest.raises(ValueError, match="sparsity"):
        traffic_with_predictor(bad)
    with pytest.raises(ValueError, match="sparsity"):
        analyse(llama, tokens(1, 8), sparsities=(0.5, bad), cache_sizes=(1,), progress=False)


def test_bad_arguments_raise(llama):
    with pytest.raises(ValueError, match="recall"):
        traffic_with_predictor(0.5, recall=0.0)
    with pytest.raises(ValueError, match="cache size"):
        reuse_curve([_masks(["11", "11"])], cache_sizes=(2,))  # no position left to measure
    with pytest.raises(ValueError, match="windows"):
        active_sets(llama, torch.tensor([1, 2, 3]), 0.5)


def test_refuses_sparsified_model():
    model = tiny_model("llama")
    countdown.sparsify(model, "cats", 0.5, mode="topk", progress=False)
    with pytest.raises(ValueError, match="dense"):
        active_sets(model, tokens(1, 8), 0.5)


def test_analyse_end_to_end(llama, tmp_path):
    result = analyse(llama, tokens(2, 24), sparsities=(0.5, 0.9), cache_sizes=(1, 2, 4), recalls=(1.0, 0.8),
                     progress=False)
    json.loads(json.dumps(result))  # JSON-serialisable
    assert set(result["sparsities"]) == {"0.5", "0.9"}
    d = result["sparsities"]["0.9"]
    assert len(d["hit_rate"]["per_layer"]) == 2 and len(d["hit_rate"]["mean"]) == 3
    assert d["hit_rate"]["min"][0] <= d["hit_rate"]["mean"][0] <= d["hit_rate"]["max"][0]
    assert d["chance_hit_rate"] == pytest.approx([1 - 0.9, 1 - 0.9**2, 1 - 0.9**4])
    t = d["traffic"]["1"]["mean"]
    assert len(t) == 4 and t[0] == pytest.approx(1 - 0.9)  # k = 0: (1 − s)
    assert all(b <= a + 1e-12 for a, b in zip(t, t[1:]))  # a bigger cache never fetches more (recall 1)
    # analyse agrees with active_sets + reuse_curve
    curve = reuse_curve(active_sets(llama, tokens(2, 24), 0.9), cache_sizes=(1, 2, 4))
    assert torch.allclose(torch.tensor(d["hit_rate"]["per_layer"]), torch.tensor(curve["hit_rate"]))
    assert "| 0.5 |" in summary_table(result, ks=(1, 4))
    png = plot_reuse(result, tmp_path / "reuse.png")
    assert png.stat().st_size > 1000
