"""SparseFFN's kernel path gives what its reference path gives, and is chosen only where it applies;
its weight layout keeps one copy of W_down; the position policy keeps prefill dense.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
``kernels="always"`` allows; on CUDA the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown import ffn, kernels
from countdown.ffn import sparse_modules
from countdown.methods import KERNEL_METHODS
from tiny_models import tiny_model, tokens

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_predictors(model, rank: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sites = countdown.ffn_sites(model)
    h, i = sites[0].hidden_size, sites[0].intermediate_size
    return [{"V": torch.randn(h, rank, generator=g), "U": torch.randn(i, rank, generator=g),
             "b": torch.randn(i, generator=g)} for _ in sites]


def _sparse_model(arch: str, method: str, sparsity: float = 0.5, mode: str = "threshold"):
    model = tiny_model(arch).to(DEVICE)
    preds = _random_predictors(model) if method == "d-countdown" else None
    calibration = tokens(4, 24) if mode == "threshold" else None
    return countdown.sparsify(model, method, sparsity, calibration=calibration, mode=mode, predictors=preds,
                              progress=False)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])  # separate, fused gate_up, gelu_tanh
@pytest.mark.parametrize("method", KERNEL_METHODS)
def test_kernel_path_matches_reference_on_a_decode_token(arch, method):
    model = _sparse_model(arch, method)
    g = torch.Generator().manual_seed(7)
    for module in sparse_modules(model):
        x = torch.randn(1, 1, module.down_proj.weight.shape[0], generator=g).to(DEVICE)
        module.kernels = "always"
        assert module.kernel_skip_reason(x) is None
        fast = module(x)
        module.kernels = "off"
        reference = module(x)
        assert fast.shape == reference.shape and fast.dtype == reference.dtype
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
        assert fast.abs().sum() > 0


def test_whole_model_decode_step_uses_kernels_and_matches(monkeypatch):
    model = _sparse_model("llama", "m-countdown", 0.7)
    ids = tokens(1, 12)
    calls = []
    method_class = type(sparse_modules(model)[0].method)
    original = method_class.kernel_forward

    def counting(self, parts, x):
        calls.append(parts.layer_idx)
        return original(self, parts, x)

    monkeypatch.setattr(method_class, "kernel_forward", counting)
    with torch.no_grad():
        countdown.set_kernels(model, "off")
        reference = model(input_ids=ids[:, -1:].to(DEVICE)).logits
        assert calls == []
        countdown.set_kernels(model, "always")
        fast = model(input_ids=ids[:, -1:].to(DEVICE)).logits
        assert calls == [0, 1]  # one kernel call per layer for the single token
        calls.clear()
        model(input_ids=ids.to(DEVICE))  # prefill: many tokens go to the reference path
        assert calls == []
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "setup, reason",
    [
        (dict(method="dhar"), "has no kernel"),
        (dict(method="m-countdown", mode="topk"), "thresholds only"),
    ],
)
def test_kernel_path_is_skipped_where_it_does_not_apply(setup, reason):
    model = _sparse_model("llama", **setup)
    module = sparse_modules(model)[0]
    module.kernels = "always"
    assert reason in module.kernel_skip_reason(torch.randn(1, 1, 32, device=DEVICE))


def test_kernel_path_reasons_for_auto_tracking_and_batches():
    model = _sparse_model("llama", "cats")
    module = sparse_modules(model)[0]
    x = torch.randn(1, 1, 32)
    if DEVICE == "cpu":  # default "auto": the C++ CPU kernels (no backward: decode runs without autograd)
        with torch.no_grad():
            assert module.kernel_skip_reason(x) == kernels.cpu.extension_reason()
        assert "autograd" in module.kernel_skip_reason(x)
    module.kernels = "always"
    assert "tokens" in module.kernel_skip_reason(torch.randn(1, 3, 32, device=DEVICE))
    module.meter = ffn.SparsityMeter()
    assert "tracking" in module.kernel_skip_reason(x.to(DEVICE))
    with pytest.raises(ValueError, match="kernels must be one of"):
        countdown.set_kernels(model, "fast")


def test_one_kernel_policy_travels_with_every_sparse_module(launches):
    """sparsify(kernels=)/set_kernels store one KernelPolicy (a mode string is one too) on every sparse FFN
    and attention projection, and its variant fields reach the kernels: TEAL's gate and up of one token
    go as one launch with fuse_gate_up, as two without."""
    model = tiny_model("llama").to(DEVICE)
    policy = countdown.KernelPolicy("always", fuse_gate_up=False)
    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 24), attention=0.5, kernels=policy,
                       progress=False)
    modules = [m for m in model.modules() if isinstance(getattr(m, "kernels", None), countdown.KernelPolicy)]
    assert len(modules) == 2 * 5 and all(m.kernels is policy for m in modules)  # 2 layers: 1 FFN + 4 projections
    ffn_module = sparse_modules(model)[0]
    x = torch.randn(1, 1, 32, device=DEVICE)
    ffn_module(x)
    assert 2 not in launches
    assert countdown.set_kernels(model, "always") == len(modules)
    assert all(m.kernels == countdown.KernelPolicy("always") for m in modules)
    launches.clear()
    ffn_module(x)
    assert launches[0] == 2  # gate and up in one launch (fuse_gate_up, the default)
    with pytest.raises(TypeError, match="KernelPolicy"):
        countdown.set_kernels(model, 3)
    with pytest.raises(ValueError, match="compact_max_batch"):
        countdown.KernelPolicy(compact_max_batch=17)


def test_kernel_path_refreshes_transposed_weight_after_set_kernels():
    model = _sparse_model("llama", "d-countdown-ideal")
    module = sparse_modules(model)[0]
    module.kernels = "always"
    x = torch.randn(1, 1, 32, device=DEVICE)
    module(x)
    with torch.no_grad():
        module.down_proj.weight.mul_(2)
    countdown.set_kernels(model, "always")
    fast = module(x)
    module.kernels = "off"
    torch.testing.assert_close(fast, module(x), rtol=1e-4, atol=1e-4)


def _storage_bytes(model) -> int:
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


def test_kernel_layout_keeps_one_copy_and_the_original_state_dict(tmp_path):
    import transformers

    model = tiny_model("llama").to(DEVICE)
    before_bytes = _storage_bytes(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    countdown.sparsify(model, "m-countdown", 0.5, calibration=tokens(4, 24), kernels="always", progress=False)
    module = sparse_modules(model)[0]
    assert module.down_t().is_contiguous()  # the kernels' [I, H] rows ...
    assert _storage_bytes(model) == before_bytes  # ... are the only copy of W_down
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], v) for k, v in state.items())
    model.save_pretrained(tmp_path / "ckpt")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").to(DEVICE)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k]), k
    countdown.unsparsify(model)
    assert model.model.layers[0].mlp.down_proj.weight.is_contiguous()


def test_decode_positions_keep_prefill_dense_and_decode_steps_sparse():
    dense_model = tiny_model("llama")
    ids = tokens(1, 12)
    with torch.no_grad():
        dense_logits = dense_model(input_ids=ids).logits
        model = countdown.sparsify(tiny_model("llama"), "cats", 0.8, mode="topk", positions="decode")
        # a generation prefill (last logits only, as model.generate / countdown.generate ask): dense
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=1).logits, dense_logits[:, -1:])
        # a plain scoring forward (every position's logits, no cache) is sparse: see test_protocol.py
        assert not torch.allclose(model(input_ids=ids).logits, dense_logits)
        countdown.unsparsify(model)
        all_positions = countdown.sparsify(model, "cats", 0.8, mode="topk")
        one_token_all = all_positions(input_ids=ids[:, :1]).logits
        countdown.unsparsify(model)
        countdown.sparsify(model, "cats", 0.8, mode="topk", positions="decode")
        torch.testing.assert_close(model(input_ids=ids[:, :1]).logits, one_token_all)  # a decode step: sparse
        assert not torch.allclose(one_token_all, dense_logits[:, :1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_protocol_masks_only_the_scored_continuation(arch):
    model, ids = tiny_model(arch), tokens(1, 64).reshape(-1)
    dense = countdown.perplexity(model, ids, context=32, positions="decode", progress=False)
    countdown.sparsify(model, "teal" if arch == "gpt2" else "m-countdown", 0.7, mode="topk", positions="decode")
    r = countdown.perplexity(model, ids, context=32, progress=False)
    strict = countdown.perplexity(model, ids, context=32, positions="decode", progress=False)
    assert r.positions == "decode" and r.n_tokens == dense.n_tokens == strict.n_tokens
    assert abs(r.sparsity - 0.7) < 0.02  # measured on the sparse (scored) positions only
    assert r.ppl != dense.ppl
    with pytest.raises(ValueError, match="positions='decode'"):
        countdown.perplexity(model, ids, context=32, positions="all", progress=False)


@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_a_decode_batch_takes_the_kernel_with_each_tokens_own_mask(method):
    model = _sparse_model("llama", method, 0.7)
    module = sparse_modules(model)[0]
    module.kernels = "always"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1, 32, generator=g).to(DEVICE)  # three sequences, one decode token each
    assert module.kernel_skip_reason(x) is None
    assert "17" in module.kernel_skip_reason(torch.randn(17, 1, 32, device=DEVICE))
    fast = module(x)
    module.kernels = "off"
    torch.testing.assert_close(fast, module(x), rtol=1e-4, atol=1e-4)
    alone = torch.cat([module(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(fast, alone, rtol=1e-4, atol=1e-4)
