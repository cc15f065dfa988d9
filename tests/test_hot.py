"""Keep frequencies, resident sets and hit rates on a tiny model (exact counts in top-k mode)."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.hot import hit_rates, keep_counts, keep_frequencies, resident_sets
from countdown.methods import keep_count
from tests.tiny_models import INTER, VOCAB, tiny_model


@pytest.fixture
def topk_model():
    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", 0.75, mode="topk", progress=False)
    return model


def _windows(n=3, length=16, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_keep_counts_count_every_position_of_every_window(topk_model):
    counts, tokens = keep_counts(topk_model, _windows())
    assert tokens == 3 * 16 and len(counts) == 2
    # top-k keeps exactly keep_count neurons per token, at every position (prefill included)
    assert all(int(c.sum()) == tokens * keep_count(INTER, 0.75) for c in counts)
    freqs = keep_frequencies(topk_model, _windows())
    torch.testing.assert_close(freqs[0], counts[0].float() / tokens)
    # the model is left as it was: decode positions policy, no wrapped keep
    assert all(m.sparse_from is None and "keep" not in m.__dict__ for m in countdown.ffn.sparse_modules(topk_model))


def test_hit_rate_bounds_and_frequency_choice(topk_model):
    windows = _windows()
    full = hit_rates(topk_model, [torch.arange(INTER)] * 2, windows)
    empty = hit_rates(topk_model, [torch.empty(0, dtype=torch.long)] * 2, windows)
    assert full["hit_rate"] == 1.0 and empty["hit_rate"] == 0.0
    assert full["kept_fraction"] == pytest.approx(keep_count(INTER, 0.75) / INTER)
    freqs = keep_frequencies(topk_model, windows)
    chosen = hit_rates(topk_model, resident_sets(freqs, 0.25, "per-layer"), windows)["hit_rate"]
    worst = [f.topk(INTER // 4, largest=False).indices for f in freqs]
    assert chosen > hit_rates(topk_model, worst, windows)["hit_rate"]
    assert chosen > 0.25  # on the text it was chosen on, the most frequent quarter beats a quarter


def test_resident_sets_sizes_and_rules():
    freqs = [torch.tensor([0.9, 0.1, 0.8, 0.0]), torch.tensor([0.2, 0.95, 0.3, 0.85])]
    g = resident_sets(freqs, 0.5, "global")
    assert sorted(g[0].tolist()) == [0, 2] and sorted(g[1].tolist()) == [1, 3]
    assert sum(len(s) for s in resident_sets(freqs, 0.25, "global")) == 2
    p = resident_sets(freqs, 0.25, "per-layer")
    assert p[0].tolist() == [0] and p[1].tolist() == [1]
    with pytest.raises(ValueError, match="rule must be"):
        resident_sets(freqs, 0.5, "nearest")
    with pytest.raises(ValueError, match="fraction must be in"):
        resident_sets(freqs, 1.5)


def test_dense_model_is_refused():
    with pytest.raises(ValueError, match="need a sparsified model"):
        keep_counts(tiny_model("llama"), _windows())
