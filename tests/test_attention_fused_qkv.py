"""q, k and v of a layer in one input-sparse launch: attention-input sparsity (KernelPolicy.fuse_qkv, on by default)
and dense models (`countdown.attention.fuse_qkv`, opt-in); same tokens as without it.

Runs the kernels everywhere (``kernels="always"``; Triton's interpreter on a CPU). The compiled decode
loop is tested in test_fuse_qkv_compile.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import countdown
from countdown import attention
from countdown.attention import FusedQKVLinear, QKVFusedAttention, SparseInputLinear, sparse_projections
from countdown.models import UnsupportedModelError
from tiny_models import tiny_model, tokens

pytest.importorskip("triton")
from countdown.kernels import input_sparse_prefetch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def snapshot(model: nn.Module) -> dict:
    """What fuse/unfuse must leave as it was: classes, layouts and instance attributes of the decoder's
    modules (the top one also holds countdown.generate's cached decoders), and the state_dict."""
    modules = {name: (type(m), sorted(m.__dict__), [(p.stride(), p.requires_grad) for p in m.parameters(recurse=False)])
               for name, m in model.model.named_modules()}
    return {"modules": modules, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def same(a: dict, b: dict) -> bool:
    return a["modules"] == b["modules"] and a["state"].keys() == b["state"].keys() and all(
        torch.equal(v, b["state"][k]) for k, v in a["state"].items())


def test_defaults_are_the_measured_winners():
    assert countdown.KernelPolicy().fuse_qkv is True and countdown.KernelPolicy().input_sparse == "auto"


def test_input_sparse_qkv_gives_the_reference_tokens_in_one_launch_per_layer(launches):
    model = tiny_model("llama").to(DEVICE)
    prompt = tokens(1, 8, seed=4).to(DEVICE)
    countdown.sparsify(model, "dense", 0.0, calibration=tokens(4, 24), attention=0.5, kernels="always",
                       progress=False)
    assert all(isinstance(a, QKVFusedAttention) for a in attention_modules(model))
    new, n_layers = 6, len(attention_modules(model))

    countdown.set_kernels(model, "off")
    reference = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    countdown.set_kernels(model, countdown.KernelPolicy("always", fuse_qkv=False))
    unfused = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    assert 3 not in launches
    attn = attention_modules(model)[0]
    assert "fuse_qkv is off" in attn.qkv_skip_reason(torch.randn(1, 1, attn.q_proj.in_features, device=DEVICE))
    countdown.set_kernels(model, "always")
    fused = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(fused, reference) and torch.equal(unfused, reference)
    # prefill is dense (positions="decode"); each later step: one launch of 3 weights per layer
    assert launches.count(3) == n_layers * (new - 1)
    assert all(p._qkv_given is None for p in sparse_projections(model))  # every hand-off cleared

    ids = prompt[:, -1:]
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
        attn = attention_modules(model)[0]
        x = torch.randn(1, 1, attn.q_proj.in_features, device=DEVICE)
        assert attn.qkv_skip_reason(x) is None
        assert "prefill" in attn.qkv_skip_reason(torch.randn(1, 3, attn.q_proj.in_features, device=DEVICE))
        # a projection never returns an output handed over for another tensor
        k = attn.k_proj
        k._qkv_given = (x.clone(), torch.zeros(1, 1, k.out_features, device=DEVICE))
        torch.testing.assert_close(k(x), F.linear(x * (x.abs() > k.sparse_threshold), k.weight, k.bias),
                                   rtol=1e-4, atol=1e-5)
        k._qkv_given = None
        countdown.set_kernels(model, "off")
        torch.testing.assert_close(fused_logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    countdown.unsparsify(model)
    assert not any(isinstance(a, QKVFusedAttention) for a in attention_modules(model))
    assert not any(hasattr(m, "_qkv_given") for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain, q/k/v bias, q_norm/k_norm
def test_dense_fuse_qkv_gives_the_same_tokens_and_unfuse_restores(arch, launches):
    model = tiny_model(arch).to(DEVICE)
    prompt = tokens(1, 8, seed=5).to(DEVICE)
    new, n_layers = 5, len(attention_modules(model))
    if arch == "qwen2":
        assert attention_modules(model)[0].q_proj.bias is not None
    before = snapshot(model)
    state = before["state"]
    reference = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    with torch.no_grad():
        ref_logits = model(input_ids=prompt).logits

    assert attention.fuse_qkv(model, kernels="always") == n_layers
    attn = attention_modules(model)[0]
    assert isinstance(attn, QKVFusedAttention) and isinstance(attn, before["modules"]["layers.0.self_attn"][0])
    assert all(type(p) is FusedQKVLinear for p in attn.qkv_projections())
    assert type(attn.o_proj) is nn.Linear
    # one copy of each weight, laid out input-major; the same state_dict
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in state.items())
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in state.values()
                                                             if v.is_floating_point()) - (
        model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0)
    assert attn.q_proj.weight.t().is_contiguous()

    fused = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(fused, reference)
    assert launches.count(3) == n_layers * new  # prefill (8 tokens) fused too, then every decode step
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt).logits, ref_logits, rtol=1e-4, atol=1e-4)

    assert attention.unfuse_qkv(model) == n_layers
    assert same(snapshot(model), before)
    assert attention.unfuse_qkv(model) == 0  # nothing left to undo


def test_dense_fuse_on_an_ffn_sparse_model(launches):
    model = tiny_model("llama").to(DEVICE)
    prompt = tokens(1, 6, seed=6).to(DEVICE)
    countdown.sparsify(model, "m-countdown", 0.5, calibration=tokens(4, 24), kernels="always", progress=False)
    reference = countdown.generate(model, prompt, max_new_tokens=4, eos_token_id=[])
    countdown.fuse_qkv(model, kernels="always")  # the public name
    assert torch.equal(countdown.generate(model, prompt, max_new_tokens=4, eos_token_id=[]), reference)
    assert launches.count(3) == 2 * 4
    countdown.unsparsify(model)  # the FFN only: q/k/v stay fused
    assert all(isinstance(a, QKVFusedAttention) for a in attention_modules(model))


def test_a_zero_input_channel_is_skipped_exactly():
    """The dense threshold keeps |x| > 0: a zero channel adds 0 · w = 0, so skipping it changes nothing."""
    g = torch.Generator().manual_seed(3)
    k, ns = 37, (24, 8, 8)
    x = torch.randn(3, 1, k, generator=g)
    x[:, :, ::3] = 0.0
    x[1] = 0.0  # a token with no channel at all
    ws = [torch.randn(k, n, generator=g) for n in ns]
    ys = input_sparse_prefetch.input_sparse_multi(x.to(DEVICE), [w.to(DEVICE) for w in ws],
                                                  [attention.DENSE_THRESHOLD] * 3)
    for y, w in zip(ys, ws):
        torch.testing.assert_close(y.cpu(), F.linear(x, w.t()), rtol=1e-5, atol=1e-5)
        assert torch.equal(y[1].cpu(), torch.zeros_like(y[1].cpu()))


def test_prefill_and_auto_on_cpu_take_the_model_path(launches):
    model = tiny_model("llama")
    attention.fuse_qkv(model)  # kernels="auto": CUDA only
    attn = attention_modules(model)[0]
    x = torch.randn(1, 1, attn.q_proj.in_features)
    assert "kernels='auto' uses them on CUDA only" in attn.qkv_skip_reason(x)
    assert not attn.q_proj.weight.t().is_contiguous()  # no relayout for a path it does not take
    countdown.generate(model, tokens(1, 4), max_new_tokens=3, eos_token_id=[])
    assert launches == []
    countdown.set_kernels(model, "always")
    assert attn.qkv_skip_reason(x) is None and attn.q_proj.kernels.mode == "always"
    assert "17 tokens" in attn.qkv_skip_reason(torch.randn(1, 17, attn.q_proj.in_features))
    with torch.no_grad():
        model(input_ids=tokens(1, 17))
    assert launches == []
    countdown.set_kernels(model, "off")
    assert "switched off" in attn.qkv_skip_reason(x)


def test_fuse_sparsify_unsparsify_unfuse_compose():
    model = tiny_model("qwen2")
    before = snapshot(model)
    attention.fuse_qkv(model, kernels="always")
    countdown.sparsify(model, "dense", 0.0, calibration=tokens(4, 24), attention=0.5, kernels="always",
                       progress=False)
    attn = attention_modules(model)[0]
    assert all(type(p) is SparseInputLinear for p in attn.qkv_projections())  # sparsity takes precedence
    assert attention.unfuse_qkv(model) == 2  # the dense opt-in is dropped; the sparse fusion stays
    assert isinstance(attn, QKVFusedAttention)
    attention.fuse_qkv(model, kernels="always")
    countdown.unsparsify(model)
    assert isinstance(attn, QKVFusedAttention)
    assert all(type(p) is FusedQKVLinear and p.kernels.mode == "always" for p in attn.qkv_projections())
    attention.unfuse_qkv(model)
    assert same(snapshot(model), before)


def test_models_without_separate_qkv_get_a_clear_error():
    with pytest.raises(ValueError, match="one projection already"):
        attention.fuse_qkv(tiny_model("phi3"))
    with pytest.raises(UnsupportedModelError):
        attention.fuse_qkv(tiny_model("gpt2"))
    with pytest.raises(ValueError, match="kernels must be one of"):
        attention.fuse_qkv(tiny_model("llama"), kernels="fast")
    model = tiny_model("llama")

    class Quantized(nn.Linear):
        pass

    model.model.layers[1].self_attn.v_proj.__class__ = Quantized
    with pytest.raises(TypeError, match="Quantized"):
        attention.fuse_qkv(model)
    assert not any(isinstance(a, QKVFusedAttention) for a in attention_modules(model))  # nothing half-done
