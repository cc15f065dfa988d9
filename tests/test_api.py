"""sparsify / unsparsify / save / load on tiny random-weight models of every architecture."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.calibrate import ScoreRecorder
from tiny_models import ARCHS, tiny_model, tokens

SPARSE_METHODS = [m for m in countdown.METHODS if m not in ("dense", "d-countdown")]


def runs_on(model, method: str) -> bool:
    """Whether ``method`` runs on this model; if not, check that it says so clearly (gated-only methods
    on a plain FFN) and leave the model dense."""
    if not countdown.get_method(method).gated_only or countdown.ffn_sites(model)[0].kind == "gated":
        return True
    with pytest.raises(ValueError, match="needs a gated FFN"):
        countdown.sparsify(model, method, 0.5, mode="topk")
    assert not countdown.is_sparsified(model)
    return False


def stats_text(method: str, ids):
    """Calibration text for methods that measure per-neuron statistics even in top-k mode (CHESS)."""
    return ids if countdown.get_method(method).stats else None


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_equals_dense(arch):
    model, ids = tiny_model(arch), tokens()
    ref = logits(model, ids)
    for method in countdown.METHODS:
        if method == "d-countdown" or not runs_on(model, method):
            continue
        countdown.sparsify(model, method, 0.0, mode="topk", positions="all", calibration=stats_text(method, ids))
        torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
        countdown.unsparsify(model)
    torch.testing.assert_close(logits(model, ids), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_topk_is_exact_per_token(arch, method):
    model, ids = tiny_model(arch), tokens(2, 16)
    if not runs_on(model, method):
        return
    countdown.sparsify(model, method, 0.75, mode="topk", calibration=stats_text(method, ids))
    r = countdown.perplexity(model, ids.reshape(-1), context=16, progress=False)
    # top-k keeps exactly I - int(0.75 * I) neurons (the official count rule) at every position of every layer
    assert all(abs(s - 0.75) < 0.02 for s in r.layer_sparsity), r.layer_sparsity
    assert r.ppl == r.ppl and r.ppl > 1


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt"])
def test_calibrated_thresholds_reach_target_on_calibration_text(arch):
    model, ids = tiny_model(arch), tokens(4, 32)
    for method in SPARSE_METHODS:
        if not runs_on(model, method):
            continue
        cal = countdown.calibrate(model, method, ids, progress=False)
        for target in (0.5, 0.9):
            countdown.sparsify(model, method, target, calibration=cal)
            r = countdown.perplexity(model, ids.reshape(-1), context=32, progress=False)
            countdown.unsparsify(model)
            # thresholds come from the dense model's scores; sparsifying earlier layers moves later
            # layers' distributions a little, so allow a few points
            assert abs(r.sparsity - target) < 0.05, (method, target, r.sparsity)


def test_sparse_model_generates_and_masks_change_output():
    model, ids = tiny_model("llama"), tokens(1, 8)
    dense_out = model.generate(ids, max_new_tokens=6, do_sample=False)
    countdown.sparsify(model, "m-countdown", 0.9, mode="topk", positions="all")
    sparse_logits = logits(model, ids)
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == dense_out.shape
    countdown.unsparsify(model)
    assert not torch.allclose(sparse_logits, logits(model, ids))


def test_state_dict_keys_unchanged_and_save_pretrained_roundtrip(tmp_path):
    import transformers

    model = tiny_model("llama")
    keys = set(model.state_dict())
    countdown.sparsify(model, "cats", 0.5, mode="topk")
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "ckpt")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    countdown.unsparsify(model)
    torch.testing.assert_close(logits(again, tokens()), logits(model, tokens()))


def test_save_and_load_sparsity_roundtrip(tmp_path):
    model, ids = tiny_model("qwen2"), tokens(3, 24)
    countdown.sparsify(model, "teal", 0.6, calibration=ids, positions="all")
    expected = logits(model, ids)
    path = countdown.save_sparsity(model, tmp_path / "a.safetensors")
    fresh = tiny_model("qwen2")
    countdown.load_sparsity(fresh, path)
    torch.testing.assert_close(logits(fresh, ids), expected)
    spec = countdown.sparsity_spec(fresh)
    assert (spec.method, spec.sparsity, spec.mode) == ("teal", 0.6, "threshold")


def test_artifact_is_pickle_free_safetensors(tmp_path):
    from safetensors import safe_open

    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", 0.5, calibration=tokens())
    path = countdown.save_sparsity(model, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        assert '"method": "m-countdown"' in f.metadata()["countdown"]
        assert f.get_tensor("thresholds").shape == (2, 1)


def test_a_methods_thresholds_do_not_depend_on_the_methods_calibrated_beside_it(monkeypatch):
    # scores are subsampled per call; each site must draw its own sample whatever else is collected
    monkeypatch.setattr(ScoreRecorder, "samples_per_call", 200)
    model, ids = tiny_model("llama"), tokens(4, 24)
    alone = countdown.calibrate_methods(model, ["m-countdown"], ids, progress=False)["m-countdown"]
    shared = countdown.calibrate_methods(model, ["cats", "teal", "m-countdown"], ids, progress=False)["m-countdown"]
    assert torch.equal(alone.thresholds(0.6), shared.thresholds(0.6))


# -- transformers round trip: save_pretrained of a sparsified model -----------------------------------


def _round_trip(model, ids, folder):
    """Save the sparsified ``model`` with plain ``save_pretrained``; check what comes back three ways."""
    import json

    import transformers

    keys = set(model.state_dict())
    expected = logits(model, ids)
    spec = countdown.sparsity_spec(model)
    model.save_pretrained(folder)
    assert not hasattr(model.config, "countdown_sparsity")  # the in-memory config is untouched
    entry = json.loads((folder / "config.json").read_text())["countdown_sparsity"]
    assert (folder / entry["file"]).is_file() and entry["method"] == spec.method
    back = countdown.from_pretrained(folder)  # the documented one-liner
    assert countdown.sparsity_spec(back) == spec and set(back.state_dict()) == keys
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=0)
    # plain transformers, no countdown code: the dense model
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not countdown.is_sparsified(plain)
    countdown.unsparsify(model)
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=0, atol=0)
    assert not torch.allclose(logits(plain, ids), expected)
    # ... and load_sparsity(model, folder) restores the sparsity on it
    countdown.load_sparsity(plain, folder)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=0)
    # a dense save after unsparsify names no sparsity
    model.save_pretrained(folder / "dense")
    assert "countdown_sparsity" not in json.loads((folder / "dense" / "config.json").read_text())
    with pytest.raises(ValueError, match="no countdown sparsity"):
        countdown.load_sparsity(tiny_model("llama"), folder / "dense")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_pretrained_round_trip_restores_the_sparsity(arch, tmp_path):
    model, ids = tiny_model(arch), tokens(2, 24)
    method = "teal" if arch == "gpt2" else "m-countdown"
    countdown.sparsify(model, method, 0.6, calibration=tokens(4, 24, seed=3), progress=False)
    _round_trip(model, ids, tmp_path / "ckpt")


def test_save_pretrained_round_trip_on_smollm2(smollm2, tmp_path):
    import copy

    import transformers

    from countdown.data import calibration_text

    gguf_model, tok = smollm2
    # transformers refuses save_pretrained of a model loaded from GGUF (its quantizer is not serialisable):
    # the same weights as a checkpoint model
    config = copy.deepcopy(gguf_model.config)
    vars(config).pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(gguf_model.state_dict())
    ids = tok("The quick brown fox jumps over the lazy dog because it was late.", return_tensors="pt").input_ids
    calib = tok(calibration_text("default")[:4000], return_tensors="pt").input_ids[:, :256]
    countdown.sparsify(model, "m-countdown", 0.7, calibration=calib, progress=False)
    _round_trip(model, ids, tmp_path / "smollm2")
