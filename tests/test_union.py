"""The union of a decode batch's kept neurons, measured on recorded masks."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.methods import keep_count
from countdown.union import union_growth, union_kept
from tiny_models import INTER, tiny_model, tokens


def test_union_kept_on_hand_made_masks():
    masks = torch.zeros(4, 1, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 0, 0] = masks[3, 0, 0] = True  # one neuron each
    assert union_kept(masks, (1, 2, 4)) == [0.25, (0.5 + 0.25) / 2, 0.5]


def test_union_grows_from_the_per_token_rate():
    model, ids = tiny_model("llama"), tokens(8, 12)
    countdown.sparsify(model, "m-countdown", 0.75, mode="topk", positions="all")
    r = union_growth(model, ids, (1, 2, 4, 8))
    assert r["kept"][0] == pytest.approx(keep_count(INTER, 0.75) / INTER)
    assert r["kept"] == sorted(r["kept"]) and r["kept"][1] > r["kept"][0] and r["kept"][-1] <= 1.0
    assert len(r["per_layer"]) == 2 and r["independent"][0] == pytest.approx(r["kept"][0])


def test_union_growth_needs_every_position_sparse():
    model = countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk")  # positions="decode" default
    with pytest.raises(ValueError, match="positions='all'"):
        union_growth(model, tokens(4, 8), (1, 2))
