"""Fused q/k/v under torch.compile: the decode step of `countdown.Decoder(..., compile=True)` traces in
one graph (fullgraph=True, no break) with one ``countdown::input_sparse_multi`` call per layer, and
gives the tokens of the unfused model.

On the CPU the compiled step runs with the "aot_eager" backend (Dynamo's trace and AOTAutograd's
functionalization with the op's fake implementation, then the op itself, which runs the kernel in
Triton's interpreter); Inductor's C++ build would add about 10 s a model without testing anything of
ours that aot_eager does not. On a GPU the default backend (Inductor) and the CUDA graph run."""

from __future__ import annotations

import pytest
import torch

import countdown
from countdown import DecodeOptions, attention
from countdown.decode import Decoder
from tiny_models import tiny_model, tokens

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def fullgraph(monkeypatch):
    """Every torch.compile in the test with fullgraph=True (a graph break raises), on CPU with aot_eager."""
    real = torch.compile
    options = {"fullgraph": True} if ON_GPU else {"fullgraph": True, "backend": "aot_eager"}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, **options}))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("arch,kind,batch", [("llama", "dense", 1), ("qwen3", "dense", 2), ("qwen2", "sparse", 1)])
def test_compiled_decode_step_is_one_graph_with_one_qkv_launch_per_layer(arch, kind, batch, fullgraph, launches):
    model = tiny_model(arch).to(DEVICE)
    prompt = tokens(batch, 20, seed=7).to(DEVICE)  # 20 tokens: prefill takes the model's own path
    mask = torch.ones_like(prompt)
    mask[1:, :3] = 0  # left padding in the second row
    new, n_layers = 5, len(model.model.layers)
    if kind == "dense":
        reference = Decoder(model, 32, batch_size=batch).generate(prompt, new, attention_mask=mask).tokens
        attention.fuse_qkv(model, kernels="always")
    else:
        countdown.sparsify(model, "m-countdown", 0.5, calibration=tokens(4, 24), attention=0.5, kernels="off",
                           progress=False)
        reference = Decoder(model, 32, batch_size=batch).generate(prompt, new, attention_mask=mask).tokens
        countdown.set_kernels(model, "always")
    launches.clear()
    decoder = Decoder(model, 32, batch_size=batch, compile=True)
    got = decoder.generate(prompt, new, attention_mask=mask).tokens
    assert torch.equal(got, reference)
    # on the CPU every step runs the compiled forward (on a GPU: warm-up, capture, then replays)
    if not ON_GPU:
        assert launches.count(3) == n_layers * (new - 1)
    assert launches.count(3) > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(p._qkv_given is None for a in attention.fused_attention_modules(model) for p in a.qkv_projections())


def test_the_op_has_a_fake_implementation_and_a_schema():
    from torch.library import opcheck

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 29, generator=g).to(DEVICE)
    ws = [torch.randn(29, n, generator=g).to(DEVICE) for n in (16, 8, 8)]
    thr = [torch.tensor([0.5], device=DEVICE)] * 3
    opcheck(torch.ops.countdown.input_sparse_multi.default, (x, ws, [None] * 3, thr, [0.0] * 3),
            test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("method, triton_attention", [("teal", False), ("m-countdown", False), ("teal", True)])
def test_compiled_step_with_gqa_attention_is_one_graph_and_keeps_the_tokens(method, triton_attention, fullgraph):
    model = tiny_model("llama").to(DEVICE)
    countdown.sparsify(model, method, 0.5, calibration=tokens(4, 24), attention=0.5, kernels="always",
                       progress=False)
    prompt = tokens(1, 20, seed=7).to(DEVICE)
    reference = Decoder(model, 32, options=DecodeOptions(gqa_attention=False)).generate(prompt, 5).tokens
    options = DecodeOptions(compile=True, attention_kernel="always" if triton_attention else "off")  # decode_attention op
    got = Decoder(model, 32, options=options).generate(prompt, 5).tokens
    assert torch.equal(got, reference)
    assert not torch._dynamo.utils.counters["graph_break"]
