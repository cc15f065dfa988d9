"""Sirius correction (countdown.correction): strict gives the dense model's greedy tokens (tiny models,
batches with padding and EOS, SmolLM2 on real text); relaxed accepts only what Sirius's rule accepts;
the CUDA-graph check equals the eager one; bad arguments give clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

import countdown
from countdown.correction import Acceptance
from countdown.data import evaluation_text, first_tokens
from countdown.decode import Decoder
from tiny_models import tiny_model, tokens


def _dense_greedy(model, ids, n, mask=None, eos=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                          eos_token_id=eos, **({} if eos else {"min_new_tokens": n}))


def _sparse_copy(model, method="teal", sparsity=0.7):
    sparse = copy.deepcopy(model)
    countdown.sparsify(sparse, method, sparsity, mode="topk", progress=False)
    return sparse


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_strict_correction_gives_the_dense_greedy_tokens_on_tiny_models(arch, k):
    dense = tiny_model(arch)
    sparse = _sparse_copy(dense)
    prompt = tokens(1, 9, seed=3)
    want = _dense_greedy(dense, prompt, 40)
    plain = Decoder(sparse, max_len=64).generate(prompt, 40)
    assert not torch.equal(plain.tokens, want)  # the sparse model alone does leave the dense path
    got = Decoder(sparse, max_len=64).generate(prompt, 40, correct_every=k)
    assert torch.equal(got.tokens, want)
    stats = got.correction
    assert stats.drafted == k * stats.rounds and 0 <= stats.accepted <= stats.drafted
    assert 1 <= stats.tokens_per_dense_forward <= k + 1 and got.new_tokens == 40


def test_strict_correction_of_a_padded_batch_with_eos_equals_dense_generate():
    dense = tiny_model("llama")
    sparse = _sparse_copy(dense)
    ids = tokens(3, 10, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    free = _dense_greedy(dense, ids, 30, mask)[:, 10:]
    eos = [int(free[0, 5]), int(free[2, 12])]  # tokens the dense model does produce, so rows stop early
    want = _dense_greedy(dense, ids, 30, mask, eos=eos)
    for k in (2, 5):
        got = countdown.generate(sparse, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0,
                                 correct_every=k)
        assert got.shape == want.shape and torch.equal(got, want), k


def test_relaxed_threshold_extremes_and_sirius_rule_hold():
    dense = tiny_model("qwen3")
    sparse = _sparse_copy(dense, "teal", 0.7)
    prompt = tokens(1, 9, seed=3)
    k, n = 4, 33
    # probability >= 1 is never reached by a draft: only the dense greedy tokens pass, as under strict
    never = Decoder(sparse, max_len=64).generate(prompt, n, correct_every=k, accept=Acceptance("relaxed", 1.0))
    strict = Decoder(sparse, max_len=64).generate(prompt, n, correct_every=k)
    assert torch.equal(never.tokens, _dense_greedy(dense, prompt, n)) and never.correction == strict.correction
    # probability >= 0 always holds: k + 1 tokens per dense forward
    always = Decoder(sparse, max_len=64).generate(prompt, n, correct_every=k, accept=Acceptance("relaxed", 0.0))
    assert always.correction.accepted == always.correction.drafted
    assert always.correction.rounds == -(-(n - 1) // (k + 1))
    # Sirius's rule: every new token is the dense model's greedy choice or has dense probability
    # softmax(z / T) >= threshold given the tokens before it
    rule = Acceptance("relaxed", threshold=0.05, temperature=0.1)  # a random model's flat logits: low bar
    got = Decoder(sparse, max_len=64).generate(prompt, n, correct_every=k, accept=rule)
    with torch.no_grad():
        logits = dense(got.tokens).logits[0, prompt.shape[1] - 1 : -1]
    new = got.tokens[0, prompt.shape[1]:]
    p = torch.softmax(logits / rule.temperature, dim=-1).gather(-1, new.view(-1, 1)).squeeze(-1)
    assert bool(((p >= rule.threshold - 1e-6) | (new == logits.argmax(-1))).all())
    assert got.correction.accepted > 0 and not torch.equal(got.tokens, strict.tokens)  # it did relax


def test_strict_correction_on_smollm2_real_text_gives_dense_greedy(smollm2, smollm2_tokenizer):
    model, tok = smollm2
    prompt = first_tokens(tok, evaluation_text(), 48, 48)[:1]
    want = _dense_greedy(model, prompt, 40)
    countdown.sparsify(model, "m-countdown", 0.7, mode="topk", progress=False)
    try:
        plain = Decoder(model, max_len=128).generate(prompt, 40)
        got = Decoder(model, max_len=128).generate(prompt, 40, correct_every=4)
    finally:
        countdown.unsparsify(model)
    assert not torch.equal(plain.tokens, want)
    assert torch.equal(got.tokens, want)
    assert got.correction.accepted > 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(correct_every=0), ValueError, "correct_every must be an int from 1"),
        (dict(correct_every=True), ValueError, "correct_every must be an int"),
        (dict(correct_every=4, do_sample=True), ValueError, "greedy decoding only"),
        (dict(correct_every=4, accept="loose"), ValueError, "acceptance rule must be one of"),
        (dict(correct_every=4, accept=0.1), TypeError, "accept must be"),
    ],
)
def test_bad_correction_arguments_give_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        countdown.generate(tiny_model("llama"), tokens(1, 5), max_new_tokens=8, **kwargs)


def test_acceptance_and_model_refusals_are_clear():
    with pytest.raises(ValueError, match="threshold is a probability"):
        Acceptance("relaxed", threshold=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Acceptance("relaxed", temperature=0)
    model = tiny_model("llama")
    countdown.sparsify(model, "teal", 0.5, mode="topk", positions="all", progress=False)
    with pytest.raises(ValueError, match="positions='all'"):
        Decoder(model, max_len=32).generate(tokens(1, 5), 8, correct_every=2)
    with pytest.raises(ValueError, match="sliding-window layer keeps only 8"):
        Decoder(tiny_model("gemma3"), max_len=32).generate(tokens(1, 5), 8, correct_every=2)
    with pytest.raises(ValueError, match="exceeds the cache"):  # the last check needs k spare slots
        Decoder(tiny_model("llama"), max_len=20).generate(tokens(1, 5), 12, correct_every=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rule", ["strict", "relaxed"])
def test_cuda_graph_correction_equals_eager_on_gpu(rule):
    dense = tiny_model("llama").cuda()
    sparse = _sparse_copy(dense)
    prompt = tokens(1, 9, seed=3).cuda()
    graph = Decoder(sparse, max_len=64, cuda_graph=True)
    first = graph.generate(prompt, 40, correct_every=4, accept=rule)
    again = graph.generate(prompt, 40, correct_every=4, accept=rule)  # replay only
    eager = Decoder(sparse, max_len=64, cuda_graph=False).generate(prompt, 40, correct_every=4, accept=rule)
    assert torch.equal(first.tokens, eager.tokens) and torch.equal(again.tokens, eager.tokens)
    assert first.correction == eager.correction
    if rule == "strict":
        assert torch.equal(first.tokens, _dense_greedy(dense, prompt, 40).cpu())
