"""The CPU decode route (countdown.cpu_route + the C++ kernels of the sparse modules): greedy tokens equal
model.generate's for dense and every method, on a tiny model and on SmolLM2; the route is really taken;
state_dict is untouched; without the extension everything falls back to the reference path with the reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.profiler import profile

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
    """Counts calls of the C++ GEMV (the dense route's ``linear`` and ``linear_input_major``, which the
    route calls on the extension module it was built with)."""

    def __init__(self, monkeypatch):
        self.calls = 0  # the GEMV's
        self.by_op: dict[str, int] = {}  # every op's
        module, reason, seconds = cpu._extension()
        count = self

        class Counted:
            def __getattr__(self, name):
                fn = getattr(module, name)

                def counted(*args):
                    count.calls += name.startswith("linear")
                    count.by_op[name] = count.by_op.get(name, 0) + 1
                    return fn(*args)

                return counted

        monkeypatch.setattr(cpu, "_extension", lambda: (Counted(), reason, seconds))


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


def _ops_run(decoder: Decoder, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, dict[str, int]]:
    """(tokens, {registered C++ op: calls}) of one generate call: a compiled step calls the ops through
    the dispatcher, which the profiler records by name."""
    with profile() as prof:
        result = decoder.generate(prompt, n)
    calls: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith(cpu.NAMESPACE + "::"):
            calls[event.name] = calls.get(event.name, 0) + 1
    return result.tokens, calls


@pytest.mark.parametrize("method", ["dense", "cats", "teal", "d-countdown-ideal"])
def test_compiled_cpu_decode_keeps_the_kernels_in_one_graph(method):
    model = tiny_model("llama")
    if method != "dense":
        countdown.sparsify(model, method, 0.5, calibration=tokens(4, 24), attention=0.5 if method == "teal" else None,
                           progress=False)
    prompt = tokens(1, 7, seed=4)
    want = _generate(model, prompt, 10)
    assert torch.equal(Decoder(model, max_len=32).generate(prompt, 10).tokens, want)  # eager
    torch._dynamo.reset()
    counters.clear()
    decoder = Decoder(model, max_len=32, options=countdown.DecodeOptions(compile=True))
    assert torch.equal(decoder.generate(prompt, 10).tokens, want)  # traces and compiles the step
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    got, calls = _ops_run(decoder, prompt, 10)  # a second call: the same compiled step, no retrace
    assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == 1
    n_linears = len(cpu_route.linear_modules(model))
    sparse_op = {"dense": None, "cats": "fused_gather_ffn", "teal": "input_sparse_linear",
                 "d-countdown-ideal": "coefficient_ffn"}[method]
    assert calls.get(f"{cpu.NAMESPACE}::linear", 0) >= 9 * (n_linears - (2 * 3 if method != "dense" else 0))
    if sparse_op is not None:
        assert calls.get(f"{cpu.NAMESPACE}::{sparse_op}", 0) >= 9 * 2  # every layer of every decode step


def test_registered_ops_equal_the_extension_functions():
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(3, 1, 33, generator=g), torch.randn(19, 33, generator=g)
    thr = torch.tensor([0.3])
    ops = getattr(torch.ops, cpu.NAMESPACE)
    assert torch.equal(ops.linear(x, w), cpu.extension().linear(x, w))
    assert torch.equal(ops.input_sparse_linear(x, w.t().contiguous(), thr, None),
                       cpu.extension().input_sparse_linear(x, w.t().contiguous(), thr, None))
    torch.library.opcheck(ops.linear.default, (x, w), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.fused_gather_ffn.default, (x, w, w, w, thr, 0, True, False, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("batch", [2, 4, 16])
@pytest.mark.parametrize("method", ["dense", "m-countdown", "cats", "teal", "d-countdown-ideal"])
def test_batched_route_takes_the_kernels_and_equals_generate(method, batch, monkeypatch):
    model = tiny_model("qwen2")
    if method != "dense":
        countdown.sparsify(model, method, 0.5, calibration=tokens(4, 24), attention=0.5 if method == "teal" else None,
                           progress=False)
    count = _Count(monkeypatch)
    prompt = tokens(batch, 6, seed=5)
    got = Decoder(model, max_len=24, batch_size=batch).generate(prompt, 8).tokens
    assert torch.equal(got, _generate(model, prompt, 8))
    # every decode step (7 of them, batch tokens each) of every layer through the C++ ops: the sparse ones
    # read the union of the rows the batch's tokens keep (cpu_kernels.cpp, `union_rows`)
    sparse_op = {"dense": "linear", "m-countdown": "fused_gather_ffn", "cats": "fused_gather_ffn",
                 "teal": "input_sparse_linear", "d-countdown-ideal": "coefficient_ffn"}[method]
    assert count.by_op.get(sparse_op, 0) >= 7 * 2
    assert count.calls >= 7  # the LM head at least


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
