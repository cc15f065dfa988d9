"""FUSE_QKV (on by default): q, k and v of a layer in one input-sparse launch, same tokens as without it.

Runs the kernels everywhere (``kernels="always"``; Triton's interpreter on a CPU)."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.attention import sparse_projections
from tiny_models import tiny_model, tokens

pytest.importorskip("triton")
from countdown.kernels import input_sparse, input_sparse_prefetch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_defaults_are_the_measured_winners():
    assert input_sparse.FUSE_QKV is True and input_sparse.VARIANT == "auto"


def test_fused_qkv_gives_the_reference_tokens_in_one_launch_per_layer(monkeypatch):
    model = tiny_model("llama").to(DEVICE)
    prompt = tokens(1, 8, seed=4).to(DEVICE)
    countdown.sparsify(model, "dense", 0.0, calibration=tokens(4, 24), attention=0.5, kernels="always",
                       progress=False)
    qkv = [p for p in sparse_projections(model) if p.site == "qkv"]
    assert all(p.qkv_group is not None and len(p.qkv_group) == 3 for p in qkv)
    new = 6

    countdown.set_kernels(model, "off")
    reference = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    countdown.set_kernels(model, "always")
    monkeypatch.setattr(input_sparse, "FUSE_QKV", False)
    unfused = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])

    launches = []
    real = input_sparse_prefetch.input_sparse_multi
    monkeypatch.setattr(input_sparse_prefetch, "input_sparse_multi",
                        lambda *a, **kw: launches.append(len(a[1])) or real(*a, **kw))
    monkeypatch.setattr(input_sparse, "FUSE_QKV", True)
    fused = countdown.generate(model, prompt, max_new_tokens=new, eos_token_id=[])
    assert torch.equal(fused, reference) and torch.equal(unfused, reference)
    # prefill is dense (positions="decode"); each later step: one launch of 3 weights per layer
    assert launches == [3] * (len(qkv) // 3) * (new - 1)
    assert not any("_qkv_result" in p.__dict__ for p in qkv)  # every left result was taken

    # one decode step's logits against the reference path, and a stale result is never returned
    ids = prompt[:, -1:]
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
        q, k, _ = qkv[0].qkv_group
        x = torch.randn(1, 1, q.in_features, device=DEVICE)
        q(x)
        x.mul_(2)  # in place: the left result no longer matches x
        torch.testing.assert_close(k(x), torch.nn.functional.linear(
            x * (x.abs() > k.sparse_threshold), k.weight, k.bias), rtol=1e-4, atol=1e-5)
        countdown.set_kernels(model, "off")
        torch.testing.assert_close(fused_logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    countdown.unsparsify(model)
    assert not any(hasattr(p, "qkv_group") for p in model.modules() if isinstance(p, torch.nn.Linear))
