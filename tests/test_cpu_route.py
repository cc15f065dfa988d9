"""The CPU decode route (countdown.cpu_route + the C++ kernels of the sparse modules): greedy tokens equal
model.generate's for dense and every method, on a tiny model and on SmolLM2; the route is really taken;
state_dict is untouched; without the extension everything falls back to the reference path with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import countdown
from countdown import cpu_route
from countdown.decode import Decoder
from countdown.ffn import sparse_modules
from countdown.kernels import cpu
from countdown.predictor import train_predictors
from tiny_models import tiny_model, tokens

pytestmark = pytest.mark.skipif(cpu.extension_reason() is not None, reason=str(cpu.extension_reason()))


def _generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


class _Count:
    """Counts calls of the C++ linear (the dense route's GEMV)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = cpu.linear

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cpu, "linear", counted)


def test_dense_route_is_taken_and_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = _Count(monkeypatch)
    prompt = tokens(1, 7)
    result = Decoder(model, max_len=32).generate(prompt, 10)
    assert torch.equal(result.tokens, _generate(model, prompt, 10))
    n_linears = sum(type(m) is nn.Linear for m in model.modules())
    assert count.calls >= 9 * n_linears  # every linear of every decode step
    assert not any("forward" in m.__dict__ for m in model.modules())  # the swap is gone
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [m for m in countdown.METHODS if m != "dense"])
def test_every_method_through_the_cpu_route_equals_generate(method, dtype):
    model, calib = tiny_model("llama"), tokens(4, 24)
    preds = None
    if method == "d-countdown":
        preds = train_predictors(model, 0.5, calib, rank=4, epochs=1, progress=False)
    attention = 0.5 if method == "teal" else None
    countdown.sparsify(model, method, 0.5, calibration=calib, predictors=preds, attention=attention, progress=False)
    model.to(dtype)
    prompt = tokens(1, 8, seed=3)
    module = sparse_modules(model)[0]
    x = torch.randn(1, 1, module.down_proj.out_features if hasattr(module, "down_proj") else 32, dtype=dtype)
    if getattr(module.method, "has_kernel", False) and module.kind == "gated":
        with torch.no_grad():
            assert module.kernel_skip_reason(x) is None  # the C++ kernel serves this decode step
    assert torch.equal(Decoder(model, max_len=32).generate(prompt, 12).tokens, _generate(model, prompt, 12))


def test_batched_route_equals_generate():
    model = tiny_model("qwen2")
    countdown.sparsify(model, "m-countdown", 0.5, calibration=tokens(4, 24), progress=False)
    prompt = tokens(4, 6, seed=5)
    got = Decoder(model, max_len=24, batch_size=4).generate(prompt, 8).tokens
    assert torch.equal(got, _generate(model, prompt, 8))


def test_without_the_extension_everything_takes_the_reference_path_and_says_why(monkeypatch):
    model = tiny_model("llama")
    countdown.sparsify(model, "cats", 0.5, calibration=tokens(4, 24), progress=False)
    reason = "C++ extension unavailable: -O3 -march=native -fopenmp: g++: not found"
    monkeypatch.setattr(cpu, "_extension", lambda: (None, reason, 0.0))
    assert sparse_modules(model)[0].kernel_skip_reason(torch.randn(1, 1, 32)) == reason
    assert cpu_route.skip_reason(model) == reason
    with cpu_route.dense_linears(model) as routed:
        assert routed == 0
    prompt = tokens(1, 8, seed=3)
    assert torch.equal(Decoder(model, max_len=32).generate(prompt, 8).tokens, _generate(model, prompt, 8))


def test_a_failed_build_is_reported_with_the_compiler_error(monkeypatch):
    def fail(flags):
        raise RuntimeError("ninja: build stopped\ncpu_kernels.cpp:1: error: no AVX\nmore")

    monkeypatch.setattr(cpu, "_build", fail)
    module, reason, _ = cpu._extension.__wrapped__()
    assert module is None
    assert reason.startswith("C++ extension unavailable") and "error: no AVX" in reason and "-march=native" in reason


def test_prefill_and_training_take_f_linear(monkeypatch):
    model = tiny_model("llama")
    count = _Count(monkeypatch)
    with cpu_route.dense_linears(model) as routed:
        assert routed > 0
        with torch.no_grad():
            model(tokens(1, 20))  # 20 tokens: prefill
        model(tokens(1, 1)).logits.sum().backward()  # autograd
    assert count.calls == 0


@pytest.mark.parametrize("method", ["dense", "cats", "m-countdown", "teal"])
def test_smollm2_greedy_tokens_through_the_cpu_route_equal_generate(smollm2, method):
    model, tok = smollm2
    prompt = tok("The Python standard library provides", return_tensors="pt").input_ids
    if method != "dense":
        calib = tok("Lists, tuples and dictionaries are the built-in containers of Python. " * 4,
                    return_tensors="pt").input_ids
        countdown.sparsify(model, method, 0.5, calibration=calib, attention=0.5 if method == "teal" else None,
                           progress=False)
    try:
        result = Decoder(model, max_len=64).generate(prompt, 24)
        assert torch.equal(result.tokens, _generate(model, prompt, 24))
    finally:
        countdown.unsparsify(model)


def test_input_sparse_projections_route_their_dense_positions_while_routed(monkeypatch):
    """Sirius's verification forward (k+1 tokens, dense under positions='decode') and the dense reference
    of `countdown.agreement` read the attention projections through the GEMV too, not F.linear."""
    from countdown.attention import SparseInputLinear

    model = tiny_model("llama")
    countdown.sparsify(model, "teal", 0.5, calibration=tokens(4, 24), attention=0.5, max_windows=None, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, SparseInputLinear)
    x = torch.randn(1, 5, q.in_features)  # a 5-token forward: every position dense (a prefill or a check)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, q.weight, q.bias)
        count = _Count(monkeypatch)
        q(x)
        assert count.calls == 0  # not routed: F.linear
        with cpu_route.dense_linears(model):
            got = q(x)
        assert count.calls == 1 and torch.allclose(got, want, atol=1e-5)
        assert "cpu_dense_route" not in q.__dict__ and not q.cpu_dense_route  # the flag is gone
    prompt = tokens(1, 7)
    with torch.no_grad():
        from countdown.agreement import dense

        with dense(model):
            want_tokens = Decoder(model, max_len=40).generate(prompt, 12).tokens
    got = Decoder(model, max_len=40).generate(prompt, 12, correct_every=4)
    assert torch.equal(got.tokens, want_tokens)  # strict correction through the route: the dense greedy tokens
