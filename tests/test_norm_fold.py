"""`countdown.norm_fold`: the RMSNorm in front of a q/k/v or TEAL gate/up launch applied inside it.
Folded and unfolded models give the same outputs; only Llama-family norms fold; the model and its
state_dict come back as they were. Kernels run everywhere (``kernels="always"``: the interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown import decode, norm_fold
from countdown.decode import Decoder
from countdown.kernels import reference
from tiny_models import tiny_model, tokens

pytest.importorskip("triton")
from countdown.kernels import input_sparse_prefetch  # noqa: E402


def folded_launches(monkeypatch) -> list[bool]:
    """Whether each input_sparse_multi call of the test got a norm to apply."""
    seen, real = [], input_sparse_prefetch.input_sparse_multi

    def spy(*args, norm=None, **kwargs):
        seen.append(norm is not None)
        return real(*args, norm=norm, **kwargs)

    monkeypatch.setattr(input_sparse_prefetch, "input_sparse_multi", spy)
    return seen


def setup(arch: str, method: str, attention: float | None) -> torch.nn.Module:
    model = tiny_model(arch)
    countdown.sparsify(model, method, 0.5, calibration=tokens(4, 24), attention=attention, kernels="always",
                       progress=False)
    if attention is None:
        countdown.fuse_qkv(model, kernels="always")
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("method, attention, per_layer", [("teal", 0.5, 2), ("m-countdown", 0.5, 2),
                                                           ("cats", None, 2), ("dense", None, 1)],
                         ids=["teal-model-wide", "m-countdown+attention", "cats+fuse_qkv", "dense+fuse_qkv"])
def test_folded_decode_step_equals_unfolded(arch, method, attention, per_layer, monkeypatch):
    model = setup(arch, method, attention)
    ids = tokens(1, 1, seed=7)  # one decode-sized token: the kernel path
    with torch.no_grad():
        want = model(input_ids=ids).logits
        seen = folded_launches(monkeypatch)
        with norm_fold.folded_norms(model) as n:
            got = model(input_ids=ids).logits
    assert n == per_layer * model.config.num_hidden_layers
    # every folded norm went into a launch: q/k/v's input_sparse_multi (the FFN's, for TEAL; the other
    # methods' FFN launch is fused_gather_ffn)
    assert seen.count(True) == model.config.num_hidden_layers * (2 if method == "teal" else 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prefill_and_reference_paths_apply_the_norm_exactly():
    model = setup("llama", "teal", 0.5)
    ids = tokens(1, 20, seed=8)  # more tokens than a launch serves: the model's own path
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with norm_fold.folded_norms(model):
            got = model(input_ids=ids).logits
            countdown.set_kernels(model, "off")
            got_off = model(input_ids=ids[:, :1]).logits
        want_off = model(input_ids=ids[:, :1]).logits
    assert torch.equal(got, want) and torch.equal(got_off, want_off)


def test_decoder_generates_the_same_tokens_folded(monkeypatch):
    model = setup("llama", "teal", 0.5)
    prompt = tokens(1, 8, seed=9)
    want = Decoder(model, max_len=24).generate(prompt, 8).tokens
    monkeypatch.setattr(decode, "FOLD_NORMS", True)
    seen = folded_launches(monkeypatch)
    got = Decoder(model, max_len=24).generate(prompt, 8).tokens
    assert torch.equal(got, want)
    assert seen.count(True) == 7 * 2 * model.config.num_hidden_layers  # 7 decode steps, 2 norms a layer
    assert not any(isinstance(m, norm_fold.FoldedNorm) for m in model.modules())  # back after the call


def test_what_does_not_fold():
    gemma = setup("gemma3", "teal", 0.5)  # (1 + weight) norms and extra feed-forward norms
    assert norm_fold.fold_norms(gemma) == 0
    plain = tiny_model("llama")  # nothing launches q/k/v as one: nothing consumes a folded norm
    assert norm_fold.fold_norms(plain) == 0
    wina = setup("llama", "wina", None)  # fused dense q/k/v fold; WINA's FFN launch does not take a norm
    assert norm_fold.fold_norms(wina) == wina.config.num_hidden_layers


def test_state_dict_and_classes_come_back():
    model = setup("qwen2", "teal", 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    n = norm_fold.fold_norms(model)
    assert n > 0 and norm_fold.fold_norms(model) == n  # folding again changes nothing
    with norm_fold.folded_norms(model) as inside:  # a block inside a lasting fold leaves it folded
        assert inside == n
    assert sum(isinstance(m, norm_fold.FoldedNorm) for m in model.modules()) == n
    assert model.state_dict().keys() == before.keys()
    assert norm_fold.unfold_norms(model) == 2 * model.config.num_hidden_layers
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with norm_fold.folded_norms(model):
            raise RuntimeError("inside")
    assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3"])
def test_reference_rms_norm_is_each_foldable_norm(arch):
    norm = tiny_model(arch).model.layers[0].input_layernorm
    assert type(norm).__name__ in norm_fold.FOLDABLE_NORMS
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        x = torch.randn(3, 5, norm.weight.numel()) * 4
        for dtype in (torch.float32, torch.bfloat16):
            n = norm.to(dtype)
            assert torch.equal(n(x.to(dtype)), reference.rms_norm(x.to(dtype), n.weight, n.variance_epsilon))


def test_real_smollm2_keeps_its_tokens_with_both_decode_switches(smollm2, monkeypatch):
    """The real model, TEAL 50% model-wide (attention inputs too): folded norms and the GQA decode
    attention (3 key/value heads for 9 query heads) give the Decoder's tokens without them."""
    model, tok = smollm2
    prompt = tok("The Python standard library provides", return_tensors="pt").input_ids
    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 64, seed=3), attention=0.5, progress=False)
    try:
        want = Decoder(model, max_len=48).generate(prompt, 16).tokens
        monkeypatch.setattr(decode, "FOLD_NORMS", True)
        monkeypatch.setattr(decode, "GQA_DECODE_ATTENTION", True)
        with norm_fold.folded_norms(model) as n:
            assert n == 2 * model.config.num_hidden_layers
        assert torch.equal(Decoder(model, max_len=48).generate(prompt, 16).tokens, want)
    finally:
        countdown.unsparsify(model)
