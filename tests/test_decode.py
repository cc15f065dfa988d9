"""The fast decode loop: same greedy tokens as model.generate, every method, clear errors."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.decode import Decoder
from countdown.predictor import train_predictors
from tiny_models import tiny_model, tokens


def _generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_greedy_tokens_equal_generate_on_tiny_models(arch):
    model = tiny_model(arch)
    prompt = tokens(1, 9)
    result = Decoder(model, max_len=40).generate(prompt, 20)
    assert torch.equal(result.tokens, _generate(model, prompt, 20))
    assert result.new_tokens == 20 and result.tokens.shape == (1, 29)


def test_decoder_is_reusable_with_another_prompt_length():
    model = tiny_model("llama")
    decoder = Decoder(model, max_len=48)
    for n_prompt in (12, 5):
        prompt = tokens(1, n_prompt, seed=n_prompt)
        assert torch.equal(decoder.generate(prompt, 10).tokens, _generate(model, prompt, 10))


def test_greedy_tokens_equal_generate_on_smollm2(smollm2, smollm2_tokenizer):
    model, tok = smollm2
    prompt = tok("The Python standard library provides", return_tensors="pt").input_ids
    result = Decoder(model, max_len=64).generate(prompt, 24)
    assert torch.equal(result.tokens, _generate(model, prompt, 24))


@pytest.mark.parametrize("method", [m for m in countdown.METHODS if m != "dense"])
def test_decoder_runs_every_method_like_the_model_does(method):
    model, calib = tiny_model("llama"), tokens(4, 24)
    preds = None
    if method == "d-countdown":
        preds = train_predictors(model, 0.5, calib, rank=4, epochs=1, progress=False)
    countdown.sparsify(model, method, 0.5, calibration=calib, predictors=preds, progress=False)
    prompt = tokens(1, 8, seed=3)
    assert torch.equal(Decoder(model, max_len=32).generate(prompt, 12).tokens, _generate(model, prompt, 12))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(input_ids=torch.zeros(2, 5, dtype=torch.long), max_new_tokens=4), ValueError, "batch size 1 only"),
        (dict(input_ids=torch.zeros(1, 30, dtype=torch.long), max_new_tokens=4), ValueError, "exceeds the cache"),
        (dict(input_ids=torch.zeros(1, 5), max_new_tokens=4), TypeError, "torch.long"),
        (dict(input_ids=torch.zeros(1, 5, dtype=torch.long), max_new_tokens=0), ValueError, "positive int"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3), ValueError, "prompt is empty"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Decoder(tiny_model("llama"), max_len=32).generate(**kwargs)


def test_bad_decoder_settings_give_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Decoder(model, max_len=10_000)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs the model on CUDA"):
            Decoder(model, max_len=32, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dense", "m-countdown", "d-countdown"])
def test_cuda_graph_loop_equals_eager_loop_on_gpu(method):
    model, calib = tiny_model("llama").cuda(), tokens(4, 24)
    if method != "dense":
        preds = train_predictors(model, 0.5, calib, rank=4, epochs=1, progress=False) if method == "d-countdown" else None
        countdown.sparsify(model, method, 0.5, calibration=calib, predictors=preds, progress=False)
    prompt = tokens(1, 8, seed=3)
    graph = Decoder(model, max_len=40, cuda_graph=True)
    first, again = graph.generate(prompt, 20), graph.generate(prompt, 20)  # capture, then replay only
    eager = Decoder(model, max_len=40, cuda_graph=False).generate(prompt, 20)
    assert torch.equal(first.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    if method == "dense":
        assert torch.equal(first.tokens, _generate(model, prompt.cuda(), 20).cpu())
