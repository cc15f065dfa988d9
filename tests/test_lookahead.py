"""Lookahead predictors: inputs from the attention input or the previous layer, same training loop,
and a sparse model whose predictor reads the earlier input (resident and offloaded alike)."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.lookahead import collect_lookahead_pairs, remove_lookahead, train_lookahead, use_lookahead
from countdown.offload import offload, unoffload
from countdown.predictor import logits_of
from tests.tiny_models import HIDDEN, INTER, VOCAB, tiny_model


def _windows(n=4, length=16):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def test_pairs_come_from_the_named_point():
    model = tiny_model("llama")
    ffn = collect_lookahead_pairs(model, _windows(), "ffn")
    att = collect_lookahead_pairs(model, _windows(), "attention")
    prev = collect_lookahead_pairs(model, _windows(), "previous")
    assert ffn[0][0].shape == (64, HIDDEN) and ffn[1][0].shape == (64, INTER)
    torch.testing.assert_close(prev[0][1], ffn[0][0])  # layer 1 reads layer 0's FFN input
    torch.testing.assert_close(prev[0][0], att[0][0])  # layer 0 falls back to its attention input
    assert not torch.allclose(att[0][1], ffn[0][1])
    with torch.no_grad():  # the attention input is the layer's input_layernorm output
        h = model.model.embed_tokens(_windows()[:1])
        torch.testing.assert_close(att[0][0][:16], model.model.layers[0].input_layernorm(h)[0])
    for i in range(2):
        torch.testing.assert_close(att[1][i], ffn[1][i])  # the labels are the same layer's |t|
    with pytest.raises(ValueError, match="unknown lookahead source"):
        collect_lookahead_pairs(model, _windows(), "future")


@pytest.mark.parametrize("source", ["attention", "previous"])
def test_lookahead_predictor_reads_the_early_input(source):
    model = tiny_model("llama")
    preds = train_lookahead(model, 0.5, _windows(), rank=8, epochs=2, source=source)
    assert len(preds) == 2 and preds.sparsity == 0.5 and 0 < preds.summary()["recall_mean"] <= 1
    countdown.sparsify(model, "d-countdown", 0.5, predictors=preds, mode="topk", positions="all", progress=False)
    use_lookahead(model, source)
    seen = {}
    norm = model.model.layers[1].input_layernorm
    handle = norm.register_forward_hook(lambda m, a, out: seen.setdefault("att", out))
    ffn = model.model.layers[1].mlp
    original = type(ffn).predict.__get__(ffn)
    calls = []
    ffn_pre = model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("prev", a[0]))
    wrapped = ffn.predict
    ffn.predict = lambda x: calls.append(x) or wrapped(x)
    ids = _windows(1, 12)
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    ffn_pre.remove()
    del ffn.predict
    early = seen["att"] if source == "attention" else seen["prev"]
    layer = {k: getattr(ffn, f"predictor_{k}") for k in ("V", "U", "b")}
    torch.testing.assert_close(wrapped(calls[0]), logits_of(layer, early))
    assert not torch.allclose(original(calls[0]), wrapped(calls[0]))
    # offloaded decode uses the same predictor input: same greedy tokens
    ref = countdown.generate(model, ids[:, :5], max_new_tokens=6, eos_token_id=[])
    offload(model, "cpu", "1GiB", reserve=0, cache=False)
    try:
        out = countdown.generate(model, ids[:, :5], max_new_tokens=6, eos_token_id=[])
    finally:
        unoffload(model)
    assert torch.equal(ref, out)
    remove_lookahead(model)
    assert "predict" not in ffn.__dict__
    with pytest.raises(ValueError, match="not in use"):
        remove_lookahead(model)
    countdown.unsparsify(model)


def test_use_lookahead_needs_predictors():
    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", 0.5, mode="topk", progress=False)
    with pytest.raises(ValueError, match="needs a model sparsified with d-countdown"):
        use_lookahead(model, "attention")
