"""The fast decode loop and countdown.generate: model.generate's greedy tokens (batches, left padding,
end-of-sequence), reproducible sampling with transformers' filters, every method, clear errors."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown import DecodeOptions
from countdown.decode import Decoder
from countdown.generation import decoder_for, generate
from countdown.predictor import train_predictors
from countdown.sampling import filter_logits
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
        (dict(input_ids=torch.zeros(2, 5, dtype=torch.long), max_new_tokens=4), ValueError, "batch size 1"),
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


# -- batches, padding, end of sequence, sampling (countdown.generate) ------------------------------

def _left_padded(lengths: list[int], width: int, seed: int = 5, pad: int = 0):
    """Prompts of the given lengths, left-padded with ``pad`` to ``width``, and their attention mask."""
    ids = tokens(len(lengths), width, seed=seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, pad), mask


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_greedy_batch_with_left_padding_equals_generate(arch):
    model = tiny_model(arch)
    ids, mask = _left_padded([11, 6, 3], 11)
    ours = generate(model, ids, mask, max_new_tokens=16)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert ours.shape == ref.shape == (3, 27) and torch.equal(ours, ref)
    alone = generate(model, ids[2:, -3:], max_new_tokens=16)  # a padded row decodes as it would alone
    assert torch.equal(ours[2:, 11:], alone[:, 3:])


def test_greedy_batch_on_smollm2_equals_generate(smollm2):
    model, tok = smollm2
    texts = ["The Python standard library provides", "Paris is"]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    assert not bool(enc.attention_mask.all())  # the second row really is padded
    ours = generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=10, pad_token_id=tok.pad_token_id)
    ref = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, ref)


def test_eos_pads_finished_rows_and_stops_like_generate():
    model = tiny_model("llama")
    ids, mask = _left_padded([9, 5, 7], 9, seed=11)
    free = generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])[:, 9:]
    # one EOS id from each row at a different step: rows finish at different times, then all stop
    eos = [int(free[0, 3]), int(free[1, 6]), int(free[2, 1])]
    kw = dict(max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    ours = generate(model, ids, mask, **kw)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(ours, ref)
    assert ours.shape[1] < 9 + 24  # stopped early
    assert bool((ours[:, 9:] == 0).any())  # some finished row was padded
    absent = next(t for t in range(97) if not bool((free[:, :10] == t).any()))
    assert generate(model, ids, mask, max_new_tokens=10, eos_token_id=absent).shape == (3, 19)


def test_default_eos_comes_from_generation_config():
    model = tiny_model("llama")
    ids = tokens(2, 6, seed=4)
    free = generate(model, ids, max_new_tokens=20, eos_token_id=[])[:, 6:]
    model.generation_config.eos_token_id = int(free[0, 2])
    try:
        ours = generate(model, ids, max_new_tokens=20)
        assert torch.equal(ours, model.generate(ids, max_new_tokens=20, do_sample=False))
    finally:
        model.generation_config.eos_token_id = 2


def test_decoders_are_cached_per_batch_and_bucket_and_recaptured_after_sparsify():
    model = tiny_model("llama")
    first = decoder_for(model, 2, 30)
    assert decoder_for(model, 2, 200) is first  # the same 256-position bucket
    assert decoder_for(model, 3, 30) is not first and first.max_len == 256
    countdown.sparsify(model, "cats", 0.5, calibration=tokens(4, 24), progress=False)
    assert decoder_for(model, 2, 30) is not first  # the model changed: a fresh capture
    prompt = tokens(1, 8, seed=3)
    assert torch.equal(generate(model, prompt, max_new_tokens=12, eos_token_id=[]), _generate(model, prompt, 12))


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_model("qwen3")
    ids, mask = _left_padded([8, 5], 8)
    kw = dict(max_new_tokens=20, do_sample=True, eos_token_id=[])

    def draw(seed, **extra):
        return generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), **kw, **extra)

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    g1 = generate(model, ids, mask, **kw, top_p=0.8)
    torch.manual_seed(7)
    assert torch.equal(g1, generate(model, ids, mask, **kw, top_p=0.8))  # the global RNG seeds it too
    greedy = generate(model, ids, mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(draw(3, top_k=1, temperature=0.7), greedy)
    assert torch.equal(draw(4, top_p=1e-6), greedy)  # only the most likely token reaches any top_p > 0


def _reference_filter(scores: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """Row by row in float64: scale, keep the k best (ties kept), then the fewest best reaching top_p."""
    out = torch.full(scores.shape, float("-inf"), dtype=torch.float64)
    for r, row in enumerate(scores.double() / temperature):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k is not None:
            keep &= row >= row.sort(descending=True).values[min(top_k, row.numel()) - 1]
        if top_p is not None:
            probs = torch.where(keep, row, float("-inf")).softmax(0)
            total = 0.0
            for i in probs.argsort(descending=True).tolist():
                if total >= top_p:
                    keep[i] = False
                total += float(probs[i])
        out[r] = torch.where(keep, row, float("-inf"))
    return out


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, None, 0.9), (0.6, 5, None), (1.7, 12, 0.5),
                                                        (1.0, 1, None), (0.8, None, 1.0), (1.3, 200, 0.3)])
def test_filters_match_a_reference_and_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 97, generator=g) * 3
    scores[0, :4] = scores[0, 10]  # ties at the top
    ours = filter_logits(scores, temperature, top_k, top_p)
    ref = _reference_filter(scores, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ours)].double(), ref[~torch.isinf(ref)])
    hf = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k is not None:
        hf = TopKLogitsWarper(top_k)(None, hf)
    if top_p is not None and top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(None, hf)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))


def test_sampling_frequencies_follow_the_filtered_distribution():
    from countdown.sampling import sample

    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(scores, 0.8, None, 0.9, g)
    expect = filter_logits(scores[:1], 0.8, None, 0.9).softmax(-1)[0]
    seen = torch.bincount(drawn, minlength=6).double() / drawn.numel()
    assert float((seen - expect.double()).abs().max()) < 0.03 and seen[expect == 0].sum() == 0


@pytest.mark.parametrize(
    "ids, kwargs, error, match",
    [
        (torch.zeros(17, 4, dtype=torch.long), {}, ValueError, "1 to 16 rows"),
        (torch.ones(2, 4, dtype=torch.long), dict(attention_mask=torch.ones(2, 5)), ValueError, "must match"),
        (torch.ones(2, 4, dtype=torch.long), dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])),
         ValueError, "all zeros"),
        (torch.ones(1, 4, dtype=torch.long), dict(attention_mask=torch.full((1, 4), 2)), ValueError, "only 0"),
        (torch.ones(1, 4, dtype=torch.long), dict(do_sample=True, top_p=0.0), ValueError, "top_p"),
        (torch.ones(1, 4, dtype=torch.long), dict(do_sample=True, top_p=1.5), ValueError, "top_p"),
        (torch.ones(1, 4, dtype=torch.long), dict(do_sample=True, temperature=0.0), ValueError, "temperature"),
        (torch.ones(1, 4, dtype=torch.long), dict(do_sample=True, temperature=-1.0), ValueError, "temperature"),
        (torch.ones(1, 4, dtype=torch.long), dict(do_sample=True, top_k=0), ValueError, "top_k"),
        (torch.ones(1, 4, dtype=torch.long), dict(eos_token_id=-3), ValueError, "eos_token_id"),
        (torch.ones(1, 4, dtype=torch.long), dict(generator=3), TypeError, "torch.Generator"),
        (torch.ones(1, 4, dtype=torch.long), dict(max_new_tokens=0), ValueError, "positive int"),
        (torch.ones(1, 250, dtype=torch.long), dict(max_new_tokens=10), ValueError, "max_position_embeddings"),
    ],
)
def test_generate_bad_input_gives_clear_errors(ids, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(tiny_model("llama"), ids, **kwargs)


def test_decoder_batch_size_limits():
    with pytest.raises(ValueError, match="from 1 to 16"):
        Decoder(tiny_model("llama"), max_len=32, batch_size=17)
    with pytest.raises(ValueError, match="batch size 2"):
        Decoder(tiny_model("llama"), max_len=32, batch_size=2).generate(tokens(3, 5), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_batches_padding_eos_and_sampling_on_gpu():
    model = tiny_model("llama").cuda()
    ids, mask = _left_padded([9, 5, 7], 9, seed=11)
    ids, mask = ids.cuda(), mask.cuda()
    free = generate(model, ids, mask, max_new_tokens=24, eos_token_id=[])
    assert torch.equal(free, model.generate(ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24,
                                            do_sample=False, pad_token_id=0))
    eos = [int(free[0, 12]), int(free[1, 15]), int(free[2, 10])]
    kw = dict(max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(generate(model, ids, mask, **kw), model.generate(ids, attention_mask=mask, do_sample=False, **kw))
    kw = dict(max_new_tokens=24, do_sample=True, top_p=0.9, temperature=0.8, eos_token_id=[])

    def draw(seed, **extra):
        return generate(model, ids, mask, generator=torch.Generator("cuda").manual_seed(seed), **{**kw, **extra})

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(draw(3, top_k=1), free)
    kw.pop("max_new_tokens")
    graph = Decoder(model, max_len=64, batch_size=3, cuda_graph=True)
    eager = Decoder(model, max_len=64, batch_size=3, cuda_graph=False)
    same = [graph.generate(ids, 24, attention_mask=mask, generator=torch.Generator("cuda").manual_seed(5), **kw).tokens
            for _ in range(2)]
    assert torch.equal(same[0], same[1])  # the capture call and a replay-only call draw the same
    ref = eager.generate(ids, 24, attention_mask=mask, generator=torch.Generator("cuda").manual_seed(5), **kw).tokens
    assert torch.equal(same[0], ref)  # replays draw the numbers eager steps draw


def test_compile_settings_come_from_the_options(monkeypatch):
    # Decoder(options=DecodeOptions(compile=True, ...)) hands its Inductor options to torch.compile, with
    # programmatic dependent launch of Inductor's kernels while compile_pdl is on and this torch has it
    import torch._inductor.config as inductor_config

    from countdown import decode

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw["options"]) or fn)
    has_option = hasattr(inductor_config.triton, "enable_pdl")
    decode._compiled(lambda x: x, DecodeOptions(compile=True))
    decode._compiled(lambda x: x, DecodeOptions(compile=True, compile_pdl=False, compile_options={}))
    assert seen[0] == {"coordinate_descent_tuning": True, **({"triton.enable_pdl": True} if has_option else {})}
    assert seen[1] == {}


def test_decode_options_are_checked_and_hashable():
    options = DecodeOptions(compile_options={"b": 1, "a": 2})
    assert options.compile_options == (("a", 2), ("b", 1))
    assert hash(options) == hash(DecodeOptions(compile_options=[("b", 1), ("a", 2)]))
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        DecodeOptions(attention_kernel="triton")
    with pytest.raises(TypeError, match="gqa_attention must be True or False"):
        DecodeOptions(gqa_attention="no")
    with pytest.raises(TypeError, match="options must be a countdown.DecodeOptions"):
        Decoder(tiny_model("llama"), 16, options={"compile": True})
    decoder = Decoder(tiny_model("llama"), 16, compile=False, options=DecodeOptions(gqa_attention=False))
    assert decoder.options == DecodeOptions(gqa_attention=False)  # compile= is a shortcut over options
    assert "options=DecodeOptions(compile=False" in repr(decoder) and "gqa_attention=False" in repr(decoder)


def _cached(model) -> list[Decoder]:
    return list(model.__dict__["_countdown_decoders"].by_key.values())


def test_generate_builds_a_new_decoder_when_an_option_changes():
    """Issue 25: countdown.generate cached its decoders on the model's modules and tensors only, so a decode
    choice changed after the first call (then module switches) replayed the graph captured under the old
    one. The DecodeOptions and every module's KernelPolicy are part of the key now."""
    model = tiny_model("llama").eval()
    prompt = tokens(1, 6)[0]
    kw = dict(max_new_tokens=4, eos_token_id=[])
    want = generate(model, prompt, **kw)
    first = _cached(model)
    assert [d.options for d in first] == [DecodeOptions()]
    off = DecodeOptions(gqa_attention=False, attention_kernel="off")
    assert torch.equal(generate(model, prompt, options=off, **kw), want)
    added = [d for d in _cached(model) if d not in first]
    assert [d.options for d in added] == [off]  # a decoder of its own, nothing captured under the default
    assert torch.equal(generate(model, prompt, options=off, **kw), want)
    assert _cached(model) == first + added  # the same options again: reused
    generate(model, prompt, compile=False, **kw)
    assert _cached(model)[-1] is first[0]  # compile=False is DecodeOptions(): the first decoder again

    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 24), progress=False)
    generate(model, prompt, **kw)
    sparse = _cached(model)
    countdown.set_kernels(model, countdown.KernelPolicy(input_sparse="walk"))  # the same mode, another variant
    generate(model, prompt, **kw)
    assert not set(_cached(model)) & set(sparse)  # the changed policy is in the key: a fresh decoder


def test_left_padded_sliding_window_steps_equal_a_cache_free_greedy_forward():
    """Gemma 3's sliding-window layers with left padding: the Decoder's tokens are those of a full forward
    over the whole sequence at every step (the ground truth of greedy decoding). transformers'
    model.generate gives other tokens for the padded row here (5.x: its sliding cache), so it is not the
    reference for this case."""
    model = tiny_model("gemma3")
    prompt = tokens(2, 9, seed=5)
    mask = torch.ones_like(prompt)
    mask[-1, :4] = 0
    got = Decoder(model, max_len=40, batch_size=2).generate(prompt, 12, attention_mask=mask).tokens
    seq, seen = prompt, mask
    with torch.no_grad():
        for _ in range(12):
            positions = (seen.cumsum(-1) - 1).clamp_min(0)
            step = model(input_ids=seq, attention_mask=seen, position_ids=positions).logits[:, -1].argmax(-1, True)
            seq, seen = torch.cat([seq, step], 1), torch.cat([seen, torch.ones_like(step)], 1)
    assert torch.equal(got, seq)
