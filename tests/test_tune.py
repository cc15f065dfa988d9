"""countdown.tune: a byte budget gives exactly its bytes; a quality budget bisects on tuning text and
reports the held-out perplexity of its pick."""

from __future__ import annotations

import pytest

import countdown
from countdown.tune import tune
from tests.tiny_models import tiny_model, tokens

CAL, SEARCH = tokens(2, 32), tokens(2, 16, seed=3)
EVAL, TUNE = tokens(1, 96, seed=7).reshape(-1), tokens(1, 96, seed=8).reshape(-1)


def test_byte_budget_reads_exactly_its_bytes_and_leaves_the_model_sparsified():
    model = tiny_model("llama")
    r = tune(model, "m-countdown", CAL, SEARCH, EVAL, bytes=0.8, context=32, kernels="off",
             log=lambda s: None)
    assert r.bytes == pytest.approx(0.8) and r.search == "sensitivity"
    assert countdown.sparsity_spec(model).allocation == r.allocation
    assert r.bytes_measured == pytest.approx(0.8, abs=0.1)  # thresholds from 64 calibration tokens
    assert r.ppl > 0 and r.dense_ppl > 0


def test_quality_budget_bisects_and_keeps_the_fewest_bytes_within_it():
    model = tiny_model("llama")
    r = tune(model, "cats", CAL, SEARCH, EVAL, max_ppl_increase=0.05, search="uniform", tune_ids=TUNE, context=32,
             steps=3, kernels="off", log=lambda s: None)
    assert len(r.tries) == 3
    within = [b for b, delta in r.tries if delta <= 0.05]
    assert within and r.bytes == pytest.approx(min(within))
    with pytest.raises(ValueError, match="give either a byte budget"):
        tune(model, "cats", CAL, SEARCH, EVAL, bytes=0.8, max_ppl_increase=0.05)
