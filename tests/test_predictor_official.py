"""The official D-COUNTDOWN predictor recipe and the ternary "bitlinear" predictor: training, the
logit > 0 keep rule, the artifact round trips, recall reports, bad options."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown import ffn
from countdown.predictor import (Predictors, load_predictors, logits_of, official_rank, predictor_recall,
                                 save_predictors, ternary_weight, train_layer, train_predictors)
from tiny_models import HIDDEN, INTER, tiny_model, tokens


def _learnable(n: int = 2000, hidden: int = 48, inter: int = 96):
    # |t| = relu of a low-rank map of x; channel 0 is constant, as LLM hidden states have such channels:
    # that is what lets a predictor without bias learn a keep rate other than one half
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, hidden, generator=g)
    x[:, 0] = 4.0
    return x, torch.relu(x @ torch.randn(hidden, 8, generator=g) @ torch.randn(8, inter, generator=g))


@pytest.mark.parametrize("kind", ["lowrank", "bitlinear"])
def test_official_recipe_training_reduces_loss_and_has_no_bias(kind):
    x, t_abs = _learnable()
    params, metrics = train_layer(x, t_abs, 0.7, rank=8, recipe="official", predictor=kind, lr=1e-2)
    assert metrics["loss_last"] < 0.8 * metrics["loss_first"]
    assert metrics["recall"] > 0.6  # chance is 0.3
    assert "b" not in params
    if kind == "lowrank":
        assert params["V"].shape == (48, 8) and params["U"].shape == (96, 8)
    else:
        assert params["W"].shape == (96, 48)


def test_ternary_weight_is_absmean_round_clip():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 19, generator=g) * 0.05 + 0.01
    m = w.abs().mean()
    expected = torch.where(w > m / 2, m, torch.where(w < -m / 2, -m, torch.zeros_like(w)))
    torch.testing.assert_close(ternary_weight(w), expected)


def test_bitlinear_weights_are_ternary_times_one_scale_and_start_from_w_up():
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, recipe="official", predictor="bitlinear", epochs=1, progress=False)
    assert preds.kind == "bitlinear" and preds.recipe == "official" and preds.keep_rule == "zero"
    for layer in preds:
        assert set(layer) == {"W"} and layer["W"].shape == (INTER, HIDDEN)
        magnitudes = layer["W"].abs().unique()
        assert len(magnitudes) == 2 and magnitudes[0] == 0  # {0, m}: ternary times one scale
    # one epoch at lr 1e-3 leaves most of the signs of the ternarised W_up it started from
    w_up = model.model.layers[0].mlp.up_proj.weight.detach()
    agree = (preds[0]["W"].sign() == ternary_weight(w_up).sign()).float().mean()
    assert agree > 0.8
    assert preds.reports[0].predictor_fraction == pytest.approx(1 / 3)


def test_official_rank_scales_with_hidden_size():
    assert official_rank(4096) == 512  # the official rank on Llama-3.1-8B
    assert official_rank(576) == 72  # SmolLM2-135M
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, recipe="official", epochs=1, progress=False)
    assert preds[0]["V"].shape == (HIDDEN, HIDDEN // 8) and set(preds[0]) == {"V", "U"}


@pytest.mark.parametrize("kind", ["lowrank", "bitlinear"])
def test_official_keep_rule_is_logit_above_zero(kind):
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, recipe="official", predictor=kind, epochs=1, progress=False)
    layer0 = model.model.layers[0].mlp
    seen = {}
    handle = layer0.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids[:2])
    handle.remove()
    x = seen["x"]
    t = torch.nn.functional.silu(layer0.gate_proj(x)) * layer0.up_proj(x)
    with torch.no_grad():
        expected = layer0.down_proj(t * (logits_of(preds[0], x) > 0))
    countdown.sparsify(model, "d-countdown", 0.5, predictors=preds, positions="all")  # no calibration needed
    spec = countdown.sparsity_spec(model)
    assert spec.mode == "threshold" and spec.threshold_rule == "zero" and "logit>0" in spec.protocol
    module = ffn.sparse_modules(model)[0]
    assert float(module.masker.thresholds[0]) == 0.0
    module.meter = ffn.SparsityMeter()
    with torch.no_grad():
        torch.testing.assert_close(module(x), expected)
    assert module.meter.measured(("coef",))["coef"] == pytest.approx(float((logits_of(preds[0], x) <= 0).float().mean()))


def test_threshold_adjust_moves_the_official_threshold_and_explicit_rules_still_calibrate():
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, recipe="official", epochs=1, progress=False)
    countdown.sparsify(model, "d-countdown", 0.5, predictors=preds, threshold_adjust=0.25)
    assert all(float(m.masker.thresholds[0]) == 0.25 for m in ffn.sparse_modules(model))
    countdown.unsparsify(model)
    countdown.sparsify(model, "d-countdown", 0.5, calibration=ids, predictors=preds, threshold_rule="pooled",
                       progress=False)
    assert countdown.sparsity_spec(model).threshold_rule == "pooled"


def test_official_bitlinear_roundtrips_through_both_artifacts(tmp_path):
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.6, ids, recipe="official", predictor="bitlinear", epochs=1, progress=False)
    path = save_predictors(model, preds, tmp_path / "p.safetensors")
    again = load_predictors(tiny_model("llama"), path)
    assert (again.recipe, again.kind, again.sparsity, again.keep_rule) == ("official", "bitlinear", 0.6, "zero")
    for a, b in zip(preds, again):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    countdown.sparsify(model, "d-countdown", 0.6, predictors=again, positions="all")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    full = countdown.save_sparsity(model, tmp_path / "d.safetensors")
    fresh = tiny_model("llama")
    countdown.load_sparsity(fresh, full)
    assert countdown.sparsity_spec(fresh).threshold_rule == "zero"
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


def test_predictor_recall_reports_per_layer():
    model, ids = tiny_model("llama"), tokens(10, 32)
    preds = train_predictors(model, 0.5, ids, rank=8, epochs=1, progress=False)
    rep = predictor_recall(model, preds, ids[:3], progress=False)
    assert len(rep.recall_topk) == len(rep.sparsity_zero) == 2 and rep.tokens == 3 * 32
    assert all(0 <= r <= 1 for r in rep.recall_topk + rep.recall_zero + rep.precision_zero + rep.sparsity_zero)
    # random logits find the true half at chance
    rand = Predictors([{k: torch.randn_like(v) for k, v in layer.items()} for layer in preds], 0.5)
    assert 0.35 < predictor_recall(model, rand, ids[:3], progress=False).mean("recall_topk") < 0.65
    # logits all > 0 keep everything: recall 1, precision = the kept share, sparsity 0
    keep_all = Predictors([{"V": torch.zeros(HIDDEN, 1), "U": torch.zeros(INTER, 1), "b": torch.ones(INTER)}] * 2, 0.5)
    rep = predictor_recall(model, keep_all, ids[:3], progress=False)
    assert rep.recall_zero == [1.0, 1.0] and rep.sparsity_zero == [0.0, 0.0]
    assert rep.precision_zero[0] == pytest.approx((INTER - int(INTER * 0.5)) / INTER)
    # logits all 0 (a zero ternary W) keep nothing under logit > 0
    none = Predictors([{"W": torch.zeros(INTER, HIDDEN)}] * 2, 0.5, recipe="official", kind="bitlinear")
    rep = predictor_recall(model, none, ids[:3], progress=False)
    assert rep.recall_zero == [0.0, 0.0] and rep.sparsity_zero == [1.0, 1.0]


def test_bad_predictor_options_are_refused():
    model, ids = tiny_model("llama"), tokens(10, 32)
    with pytest.raises(ValueError, match="unknown predictor recipe 'paper'"):
        train_predictors(model, 0.5, ids, recipe="paper", progress=False)
    with pytest.raises(ValueError, match="unknown predictor kind 'mlp'"):
        train_predictors(model, 0.5, ids, predictor="mlp", progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_predictors(model, 0.5, ids, epochs=0, progress=False)
    with pytest.raises(ValueError, match="no predictor"):
        countdown.sparsify(model, "cats", 0.5, calibration=ids, threshold_rule="zero", progress=False)
    with pytest.raises(ValueError, match="untrained"):
        predictor_recall(model, Predictors([{}, {}], None), ids, progress=False)
    assert not countdown.is_sparsified(model)


def test_cli_trains_official_bitlinear(tmp_path, smollm2_tokenizer):
    import transformers
    from typer.testing import CliRunner

    from countdown.cli import app

    cfg = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=72,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    ckpt = tmp_path / "tiny"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(ckpt)
    smollm2_tokenizer.save_pretrained(ckpt)
    out = tmp_path / "p.safetensors"
    r = CliRunner().invoke(app, ["train-predictors", "--model", str(ckpt), "--recipe", "official", "--predictor",
                                 "bitlinear", "--sparsity", "0.5", "--epochs", "1", "--calib-windows", "2",
                                 "--text", "pydoc-topics", "--context", "64", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "official bitlinear" in r.output and "logit > 0" in r.output
    loaded = load_predictors(transformers.AutoModelForCausalLM.from_pretrained(ckpt), out)
    assert (loaded.recipe, loaded.kind) == ("official", "bitlinear")
    bad = CliRunner().invoke(app, ["train-predictors", "--model", str(ckpt), "--recipe", "paper", "-o", str(out),
                                   "--text", "pydoc-topics", "--context", "64", "--device", "cpu"])
    assert bad.exit_code != 0 and "unknown predictor recipe" in bad.output
