"""Input sparsity of attention projections: exact at sparsity 0, calibrated, kernel = reference, one copy."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.attention import SparseInputLinear, sparse_projections
from countdown.models import UnsupportedModelError
from tiny_models import tiny_model, tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GATED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", GATED)
def test_attention_sparsity_zero_equals_dense(arch):
    model, ids = tiny_model(arch), tokens(2, 16)
    keys = set(model.state_dict())
    # the reference: the same FFN modules (Phi-3's fused gate_up is split there), attention dense
    countdown.sparsify(model, "dense", 0.0, mode="topk", positions="all")
    ref = logits(model, ids)
    countdown.unsparsify(model)
    countdown.sparsify(model, "dense", 0.0, calibration=ids, attention=0.0, positions="all", progress=False)
    assert len(sparse_projections(model)) == (2 if arch == "phi3" else 4) * 2
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=0)
    countdown.unsparsify(model)
    assert not sparse_projections(model)
    assert all(type(m) is not SparseInputLinear for m in model.modules())


def test_calibrated_attention_sparsity_reaches_target_and_composes_with_an_ffn_method():
    model, ids = tiny_model("llama"), tokens(4, 32)
    countdown.sparsify(model, "m-countdown", 0.7, calibration=ids, attention=0.5, positions="all", progress=False)
    spec = countdown.sparsity_spec(model)
    assert (spec.method, spec.sparsity, spec.attention) == ("m-countdown", 0.7, 0.5)
    r = countdown.perplexity(model, ids.reshape(-1), context=32, progress=False)
    assert abs(r.sparsity - 0.7) < 0.06
    assert set(r.attention_sparsity) == {"qkv", "o"}
    assert all(abs(s - 0.5) < 0.06 for s in r.attention_sparsity.values()), r.attention_sparsity


def test_teal_model_wide_is_one_call_and_round_trips_through_the_artifact(tmp_path):
    model, ids = tiny_model("qwen2"), tokens(4, 32)  # q/k/v biases
    countdown.sparsify(model, "teal", 0.5, calibration=ids, attention=0.5, positions="all", progress=False)
    expected = logits(model, ids)
    path = countdown.save_sparsity(model, tmp_path / "teal50.safetensors")
    fresh = tiny_model("qwen2")
    countdown.load_sparsity(fresh, path)
    torch.testing.assert_close(logits(fresh, ids), expected)
    assert countdown.sparsity_spec(fresh).attention == 0.5


@pytest.mark.parametrize("arch", ["llama", "phi3", "qwen2"])
def test_kernel_path_equals_reference_and_keeps_one_weight_copy(arch):
    pytest.importorskip("triton")
    model = tiny_model(arch).to(DEVICE)
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 24), attention=0.5, kernels="always", progress=False)
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == before
    g = torch.Generator().manual_seed(3)
    for projection in sparse_projections(model)[:3]:
        x = torch.randn(2, 1, projection.in_features, generator=g).to(DEVICE)  # two decode tokens
        assert projection.kernel_skip_reason(x) is None
        fast = projection(x)
        projection.kernels = "off"
        torch.testing.assert_close(fast, projection(x), rtol=1e-4, atol=1e-4)
        projection.kernels = "always"
    ids = tokens(1, 6).to(DEVICE)
    with torch.no_grad():
        countdown.set_kernels(model, "off")
        reference = model(input_ids=ids[:, -1:]).logits
        countdown.set_kernels(model, "always")
        torch.testing.assert_close(model(input_ids=ids[:, -1:]).logits, reference, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_unchanged_at_attention_sparsity_zero():
    model, prompt = tiny_model("llama"), tokens(1, 8, seed=4)
    dense = countdown.generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    countdown.sparsify(model, "dense", 0.0, calibration=tokens(4, 24), attention=0.0, progress=False)
    assert torch.equal(countdown.generate(model, prompt, max_new_tokens=12, eos_token_id=[]), dense)


def test_attention_sparsity_needs_calibration_and_a_known_layout():
    with pytest.raises(ValueError, match="attention=... needs calibration"):
        countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk", attention=0.5)
    with pytest.raises(UnsupportedModelError, match="attention sparsity"):
        countdown.sparsify(tiny_model("gpt2"), "cats", 0.5, calibration=tokens(), attention=0.5)
