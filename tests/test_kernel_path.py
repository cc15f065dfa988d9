"""SparseFFN's kernel path gives what its reference path gives, and is chosen only where it applies.

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), which
``kernels="always"`` allows; on CUDA the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown.ffn import sparse_modules
from countdown.kernel_path import KERNEL_METHODS, kernel_skip_reason
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
        assert kernel_skip_reason(module, x) is None
        fast = module(x)
        module.kernels = "off"
        reference = module(x)
        assert fast.shape == reference.shape and fast.dtype == reference.dtype
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
        assert fast.abs().sum() > 0


def test_whole_model_decode_step_uses_kernels_and_matches():
    model = _sparse_model("llama", "m-countdown", 0.7)
    ids = tokens(1, 12)
    calls = []
    original = countdown.kernel_path.run_kernel

    def counting(module, x):
        calls.append(module.layer_idx)
        return original(module, x)

    countdown.ffn.run_kernel = counting
    try:
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
    finally:
        countdown.ffn.run_kernel = original
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "setup, reason",
    [
        (dict(method="teal"), "has no kernel"),
        (dict(method="m-countdown", mode="topk"), "thresholds only"),
    ],
)
def test_kernel_path_is_skipped_where_it_does_not_apply(setup, reason):
    model = _sparse_model("llama", **setup)
    module = sparse_modules(model)[0]
    module.kernels = "always"
    assert reason in kernel_skip_reason(module, torch.randn(1, 1, 32, device=DEVICE))


def test_kernel_path_reasons_for_auto_tracking_and_batches():
    model = _sparse_model("llama", "cats")
    module = sparse_modules(model)[0]
    x = torch.randn(1, 1, 32)
    if DEVICE == "cpu":
        assert "CUDA only" in kernel_skip_reason(module, x)  # default "auto"
    module.kernels = "always"
    assert "tokens" in kernel_skip_reason(module, torch.randn(1, 3, 32, device=DEVICE))
    module.masker.track = True
    assert "tracking" in kernel_skip_reason(module, x.to(DEVICE))
    with pytest.raises(ValueError, match="kernels must be one of"):
        countdown.set_kernels(model, "fast")


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
