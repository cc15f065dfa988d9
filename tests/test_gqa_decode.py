"""`countdown.gqa_decode`: one-token grouped-query attention without the repeated KV copy equals
transformers' sdpa, every other call is transformers' own, and the Decoder uses it only while decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import countdown
from countdown import DecodeOptions, gqa_decode
from countdown.decode import Decoder
from tiny_models import tiny_model, tokens


def _inputs(batch: int, kv_heads: int, groups: int, length: int, dim: int, seed: int, q_len: int = 1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, q_len, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g)
    visible = torch.rand(batch, 1, q_len, length, generator=g) > 0.3
    visible[..., 0] = True  # every row sees a slot (an all-masked row is NaN in both)
    return q, k, v, visible


@pytest.mark.parametrize("batch, kv_heads, groups", [(1, 2, 4), (3, 3, 3), (2, 1, 7)])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
def test_one_token_step_equals_transformers_sdpa(batch, kv_heads, groups, mask_kind):
    q, k, v, visible = _inputs(batch, kv_heads, groups, length=13, dim=24, seed=batch * 10 + groups)
    mask = visible if mask_kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, -1e9)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    assert gqa_decode._packable(module, q, k, mask, 0.0, {})
    got, _ = gqa_decode.gqa_decode_sdpa(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (batch, 1, kv_heads * groups, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["prefill", "no mask", "softcap", "per-head mask", "one group", "dropout"])
def test_other_calls_are_transformers_own(case):
    q_len = 5 if case == "prefill" else 1
    groups = 1 if case == "one group" else 2
    q, k, v, mask = _inputs(2, 2, groups, length=9, dim=8, seed=3, q_len=q_len)
    kwargs = {"softcap": 30.0} if case == "softcap" else {}
    if case == "no mask":
        mask = None
    if case == "per-head mask":
        mask = mask.expand(2, q.shape[1], q_len, 9)
    dropout = 0.1 if case == "dropout" else 0.0
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)
    assert not gqa_decode._packable(module, q, k, mask, dropout, kwargs)


# gemma3 (sliding-window layers) at one row: with left padding model.generate's tokens differ from a cache-free
# greedy forward, which the Decoder's equal (tests/test_decode.py), so generate is no reference there
@pytest.mark.parametrize("arch, batch", [("llama", 2), ("qwen2", 2), ("mistral", 2), ("gemma3", 1)])
def test_decoder_steps_use_it_and_keep_generate_tokens(arch, batch, monkeypatch):
    model = tiny_model(arch)
    packed = []
    real = gqa_decode._packable
    monkeypatch.setattr(gqa_decode, "_packable", lambda *a: packed.append(real(*a)) or packed[-1])
    prompt = tokens(batch, 9, seed=5)
    mask = torch.ones_like(prompt)
    mask[-1, : 4 if batch > 1 else 0] = 0  # left padding: the mask differs per row
    result = Decoder(model, max_len=40, batch_size=batch).generate(prompt, 12, attention_mask=mask)  # on by default
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(result.tokens, want)
    # 11 decode steps x 2 layers packed; the prefill call is not
    assert packed.count(True) == 11 * model.config.num_hidden_layers
    assert model.config._attn_implementation == "sdpa"


def test_switch_off_and_models_it_does_not_apply_to(monkeypatch):
    model = tiny_model("llama")
    packed = []
    monkeypatch.setattr(gqa_decode, "_packable", lambda *a: packed.append(True) or False)
    Decoder(model, max_len=24, options=DecodeOptions(gqa_attention=False)).generate(tokens(1, 6), 4)
    assert packed == []
    assert not gqa_decode.applies(tiny_model("gpt2"))  # one key/value head per query head
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert not gqa_decode.applies(eager)


@pytest.mark.parametrize("arch, batch", [("llama", 2), ("qwen2", 3)])
def test_decoder_steps_through_the_triton_kernel_keep_generate_tokens(arch, batch, monkeypatch):
    from countdown import kernels

    if not (torch.cuda.is_available() or kernels.HAS_TRITON and kernels.interpret_mode()):
        pytest.skip("needs CUDA or Triton's interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    model = tiny_model(arch).to(device)
    prompt = tokens(batch, 9, seed=6).to(device)
    mask = torch.ones_like(prompt)
    mask[-1, :3] = 0  # left padding: the mask differs per row
    options = DecodeOptions(attention_kernel="always")
    result = Decoder(model, max_len=40, batch_size=batch, options=options).generate(prompt, 10, attention_mask=mask)
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=0)
    assert torch.equal(result.tokens, want)
    assert len(calls) == 9 * model.config.num_hidden_layers  # every decode step of every layer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_generate_inside_the_block_keeps_its_tokens(arch, monkeypatch):
    """A user's own ``model.generate`` (dynamic cache, eager) can use it too: same tokens, packed steps."""
    model = tiny_model(arch)
    prompt = tokens(3, 8, seed=11)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    mask[2, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, **kwargs)
    packed = []
    real = gqa_decode._packable
    monkeypatch.setattr(gqa_decode, "_packable", lambda *a: packed.append(real(*a)) or packed[-1])
    with gqa_decode.decode_attention(model) as switched:
        got = model.generate(prompt, **kwargs)
    assert switched and torch.equal(got, want)
    assert packed.count(True) == 8 * model.config.num_hidden_layers


def test_model_gets_sdpa_back_when_the_block_raises():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="inside"):
        with gqa_decode.decode_attention(model) as switched:
            assert switched and model.config._attn_implementation == gqa_decode.NAME
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_real_smollm2_with_teal_keeps_its_tokens(smollm2, monkeypatch):
    """The real model (3 key/value heads for 9 query heads), TEAL 50% model-wide, attention inputs
    too: the Decoder's tokens are the same with the GQA decode attention as with transformers' sdpa."""
    model, tok = smollm2
    prompt = tok("The Python standard library provides", return_tensors="pt").input_ids
    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 64, seed=3), attention=0.5, progress=False)
    try:
        want = Decoder(model, max_len=48, options=DecodeOptions(gqa_attention=False)).generate(prompt, 16).tokens
        packed = []
        real = gqa_decode._packable
        monkeypatch.setattr(gqa_decode, "_packable", lambda *a: packed.append(real(*a)) or packed[-1])
        assert torch.equal(Decoder(model, max_len=48).generate(prompt, 16).tokens, want)
        assert packed.count(True) == 15 * model.config.num_hidden_layers
    finally:
        countdown.unsparsify(model)


def test_auto_uses_the_kernel_on_cuda_only_and_bad_choice_is_named():
    from countdown import kernels

    rows = torch.randn(1, 2, 3, 8)
    key = value = torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    assert not gqa_decode._use_kernel("auto", rows, key, value, mask)  # CPU tensors: SDPA, never the interpreter
    assert not gqa_decode._use_kernel("off", rows, key, value, mask)
    if kernels.HAS_TRITON and kernels.interpret_mode():
        assert gqa_decode._use_kernel("always", rows, key, value, mask)
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        gqa_decode._use_kernel(True, rows, key, value, mask)
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        gqa_decode.decode_attention(tiny_model("llama"), "triton").__enter__()


def test_each_attention_kernel_choice_has_its_own_registered_name():
    # the choice travels in the attention implementation's name: nothing module-wide to flip
    from transformers import AttentionInterface

    names = {gqa_decode.register(k) for k in ("auto", "always", "off")}
    assert len(names) == 3 and gqa_decode.NAME in names
    assert AttentionInterface._global_mapping[gqa_decode.attention_name("off")].keywords == {"attention_kernel": "off"}
