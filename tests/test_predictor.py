"""D-COUNTDOWN predictors: training, the artifact round trip, refusal of another model's predictors."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.predictor import auto_rank, load_predictors, save_predictors, train_layer, train_predictors
from tiny_models import tiny_model, tokens


def test_training_reduces_loss_and_beats_chance_on_learnable_labels():
    # |t| = relu of a low-rank map of x (one-signed, like SiLU's large side): a linear rank-8 predictor
    # can rank it, so it must learn which neurons are large
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 48, generator=g)
    t_abs = torch.relu(x @ torch.randn(48, 8, generator=g) @ torch.randn(8, 96, generator=g))
    params, metrics = train_layer(x, t_abs, 0.7, rank=8, epochs=10)
    assert metrics["loss_last"] < 0.6 * metrics["loss_first"]
    assert metrics["recall"] > 0.8  # chance is 0.3 (keeping 30% at random)
    assert params["V"].shape == (48, 8) and params["U"].shape == (96, 8) and params["b"].shape == (96,)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_d_countdown_runs_with_trained_predictors(arch):
    model, ids = tiny_model(arch), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, rank=8, epochs=2, progress=False)
    assert len(preds) == len(preds.reports) == 2
    countdown.sparsify(model, "d-countdown", 0.5, mode="topk", predictors=preds)
    r = countdown.perplexity(model, ids.reshape(-1), context=32, progress=False)
    assert abs(r.sparsity - 0.5) < 0.02 and r.ffn_bytes_read == pytest.approx(0.5, abs=0.02)


def test_predictors_roundtrip_through_sparsity_artifact(tmp_path):
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.6, ids, rank=8, epochs=1, progress=False)
    countdown.sparsify(model, "d-countdown", 0.6, calibration=ids, predictors=preds, positions="all", progress=False)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    path = countdown.save_sparsity(model, tmp_path / "d.safetensors")
    fresh = tiny_model("llama")
    countdown.load_sparsity(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


def test_predictor_artifact_roundtrip_and_refused_for_another_model(tmp_path):
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, rank=8, epochs=1, progress=False)
    path = save_predictors(model, preds, tmp_path / "p.safetensors")
    again = load_predictors(tiny_model("llama"), path)
    for a, b in zip(preds, again):
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    with pytest.raises(ValueError, match="made for another model"):
        load_predictors(tiny_model("llama", seed=5), path)


def test_bad_predictor_arguments():
    model, ids = tiny_model("llama"), tokens(10, 32)
    with pytest.raises(ValueError, match="rank"):
        train_predictors(model, 0.5, ids, rank=10_000, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        train_predictors(model, 0.5, ids[:1], rank=4, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        train_predictors(model, 1.5, ids, rank=4, progress=False)
    with pytest.raises(ValueError, match="layers"):
        countdown.sparsify(model, "d-countdown", 0.5, mode="topk", predictors=[{}])


def test_auto_rank_matches_paper_ratio():
    assert auto_rank(4096, 14336) == 512  # the paper's Llama-3.1-8B setting
    assert auto_rank(576, 1536) == 64  # SmolLM2-135M


def test_predictors_trained_for_another_sparsity_are_refused():
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.7, ids, rank=4, epochs=1, progress=False)
    assert preds.sparsity == 0.7
    with pytest.raises(ValueError, match="trained for 70% sparsity, not 50%"):
        countdown.sparsify(model, "d-countdown", 0.5, mode="topk", predictors=preds)
    assert not countdown.is_sparsified(model)


def test_train_predictors_takes_text_like_sparsify(smollm2_tokenizer):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=72,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    from countdown.data import calibration_text

    text = calibration_text("pydoc-topics")[:20000]
    preds = countdown.train_predictors(model, 0.5, calibration=text, tokenizer=smollm2_tokenizer, seq_len=64,
                                       max_windows=6, rank=4, epochs=1, progress=False)
    countdown.sparsify(model, "d-countdown", 0.5, calibration=text, tokenizer=smollm2_tokenizer, seq_len=64,
                       max_windows=4, predictors=preds, progress=False)
    assert countdown.sparsity_spec(model).method == "d-countdown"
    assert all(m.predictor_V.dtype == next(model.parameters()).dtype for m in countdown.ffn.sparse_modules(model))
