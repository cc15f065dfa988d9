"""Behaviour that depends on real activations: the real SmolLM2-135M model on real text."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.data import calibration_text, evaluation_text, first_tokens

SEQ = 256


@pytest.fixture(scope="module")
def texts(smollm2):
    _, tok = smollm2
    calib = first_tokens(tok, calibration_text(), 4 * SEQ, SEQ)
    held_out = first_tokens(tok, evaluation_text(), 2 * SEQ, SEQ).reshape(-1)
    return calib, held_out


def test_dense_perplexity_is_that_of_a_trained_model(smollm2, texts):
    model, _ = smollm2
    r = countdown.perplexity(model, texts[1], context=SEQ, progress=False)
    assert 5 < r.ppl < 40, r.ppl  # a random-weight model of this vocabulary would be ~50,000


METHODS = ["cats", "m-countdown", "d-countdown-ideal", "teal"]


@pytest.fixture(scope="module")
def calibrations(smollm2, texts):
    return countdown.calibrate_methods(smollm2[0], METHODS, texts[0], max_windows=None, progress=False)


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_calibrated_thresholds_reach_target_on_held_out_text(smollm2, texts, calibrations, target):
    model, _ = smollm2
    held_out = texts[1]
    for method in METHODS:
        cals = calibrations
        countdown.sparsify(model, method, target, calibration=cals[method], progress=False)
        try:
            r = countdown.perplexity(model, held_out, context=SEQ, progress=False)
        finally:
            countdown.unsparsify(model)
        assert abs(r.sparsity - target) <= 0.03, (method, target, r.sparsity)


def test_sparsity_costs_perplexity_monotonically(smollm2, texts):
    model, _ = smollm2
    ppl = []
    for s in (0.0, 0.5, 0.9):
        countdown.sparsify(model, "m-countdown", s, mode="topk")
        ppl.append(countdown.perplexity(model, texts[1], context=SEQ, progress=False).ppl)
        countdown.unsparsify(model)
    assert ppl[0] < ppl[1] < ppl[2], ppl


def test_save_load_on_real_model_gives_identical_logits(smollm2, texts, tmp_path):
    model, _ = smollm2
    calib, held_out = texts
    countdown.sparsify(model, "cats", 0.7, calibration=calib, positions="all", progress=False)
    ids = held_out[:64].unsqueeze(0)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = countdown.save_sparsity(model, tmp_path / "cats70.safetensors")
    countdown.unsparsify(model)
    countdown.load_sparsity(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    countdown.unsparsify(model)
