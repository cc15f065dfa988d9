"""Non-uniform sparsity (countdown.Allocation): uniform allocations equal today's uniform results
exactly, per-layer targets are what each layer gets, the artifact keeps them, bad ones are refused."""

from __future__ import annotations

import pytest
import torch
import transformers

import countdown
from countdown import Allocation, ffn
from countdown.evaluate import perplexity
from tests.tiny_models import CONFIGS, tiny_model, tokens

CAL = tokens(4, 24)
IDS = tokens(1, 40, seed=5)
OPTS = {"positions": "all", "progress": False, "kernels": "off"}


def _run(model, method, sparsity, mode, **kw):
    countdown.sparsify(model, method, sparsity, calibration=CAL, mode=mode, **OPTS, **kw)
    try:
        with torch.no_grad():
            logits = model(IDS).logits
        modules = ffn.sparse_modules(model)
        thresholds = torch.stack([m.masker.thresholds for m in modules])
        attention = countdown.attention.thresholds_of(model)
        return logits, thresholds, attention
    finally:
        countdown.unsparsify(model)


@pytest.mark.parametrize("method,mode,attention", [
    ("teal", "threshold", 0.3), ("teal", "topk", None), ("m-countdown", "threshold", None),
    ("m-countdown", "topk", None), ("chess", "threshold", None),
])
def test_allocation_with_every_layer_at_s_is_exactly_uniform(method, mode, attention):
    model = tiny_model("llama")
    logits, thresholds, att = _run(model, method, 0.5, mode, attention=attention)
    shorthand = _run(model, method, [0.5, 0.5], mode, attention=None if attention is None else [0.3, 0.3])
    sites = countdown.get_method(method).sites + (("qkv", "o") if attention is not None else ())
    values = {s: [0.3 if s in ("qkv", "o") else 0.5] * 2 for s in sites}
    explicit = _run(model, method, Allocation(values), mode)
    for got in (shorthand, explicit):
        assert torch.equal(got[0], logits)
        assert torch.equal(got[1], thresholds)
        assert (got[2] is None and att is None) or torch.equal(got[2], att)


def test_per_layer_targets_are_each_layers_own():
    model = tiny_model("llama")
    # top-k: exactly each layer's count (72 neurons: floor drops int(72 s))
    countdown.sparsify(model, "m-countdown", [0.25, 0.75], mode="topk", **OPTS)
    r = perplexity(model, IDS, context=40, progress=False)
    countdown.unsparsify(model)
    assert r.layer_sparsity == [pytest.approx(18 / 72), pytest.approx(54 / 72)]
    # threshold: each (layer, site) calibrated to its own target, measured on the calibration text
    alloc = Allocation({"input": [0.2, 0.6], "coef": [0.7, 0.1]})
    countdown.sparsify(model, "teal", alloc, calibration=CAL, **OPTS)
    spec = countdown.sparsity_spec(model)
    assert spec.allocation == alloc and spec.sparsity == pytest.approx(0.4)
    meters = []
    for m in ffn.sparse_modules(model):
        m.meter = ffn.SparsityMeter()
        meters.append(m.meter)
    with torch.no_grad():
        model(CAL)
    countdown.unsparsify(model)
    measured = [m.measured(("input", "coef")) for m in meters]
    for layer, row in zip(measured, alloc.values):
        assert layer["input"] == pytest.approx(row[0], abs=0.05)
        assert layer["coef"] == pytest.approx(row[1], abs=0.08)


def test_allocation_round_trips_in_the_artifact_and_refuses_another_layer_count(tmp_path):
    model = tiny_model("llama")
    alloc = Allocation({"input": [0.2, 0.6], "coef": [0.7, 0.1], "qkv": [0.4, 0.2], "o": [0.1, 0.5]})
    countdown.sparsify(model, "teal", alloc, calibration=CAL, **OPTS)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path / "ckpt")
    countdown.save_sparsity(model, tmp_path / "s.safetensors")
    again = countdown.from_pretrained(tmp_path / "ckpt", kernels="off")
    assert countdown.sparsity_spec(again).allocation == alloc
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, expected)

    config = CONFIGS["llama"]()
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    deeper = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="allocates sparsity to 2 layers, this model has 3"):
        countdown.load_sparsity(deeper, tmp_path / "s.safetensors")
    assert not countdown.is_sparsified(deeper)


@pytest.mark.parametrize("sparsity,kw,match", [
    ([0.5, 0.5, 0.5], {}, "allocation has 3 layers, the model has 2"),
    ([0.5, 1.0], {}, r"layer 1: sparsity must be in \[0, 1\), got 1.0"),
    ([0.5, -0.1], {}, r"must be in \[0, 1\)"),
    ([0.5, "x"], {}, "must be a number"),
    (Allocation({"coef": [0.5, 0.5], "gate": [0.1, 0.1]}), {}, "unknown site.*'gate'"),
    (Allocation({"coef": [0.5, 0.5]}), {}, "no sparsity for site 'input'"),
    (Allocation({"input": [0.5, 0.5], "coef": [0.5, 0.5], "qkv": [0.5, 0.5]}), {}, "no sparsity for site 'o'"),
    (Allocation({"input": [0.5, 0.5], "coef": [0.5, 0.5], "qkv": [0.5, 0.5], "o": [0.5, 0.5]}),
     {"attention": 0.5}, "leave attention=None"),
    (0.5, {"attention": [0.5]}, "allocation has 1 layers, the model has 2"),
])
def test_bad_allocations_are_clear_errors_before_the_model_is_touched(sparsity, kw, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        countdown.sparsify(model, "teal", sparsity, calibration=CAL, **OPTS, **kw)
    assert not countdown.is_sparsified(model)


def test_allocation_constructor_refuses_ragged_sites():
    with pytest.raises(ValueError, match="one sparsity per layer"):
        Allocation({"input": [0.5, 0.5], "coef": [0.5]})
    with pytest.raises(ValueError, match="no layers"):
        Allocation([])
    assert Allocation.from_meta(Allocation({"coef": [0.1, 0.2]}).to_meta()) == Allocation({"coef": [0.1, 0.2]})


def test_kernel_path_serves_per_layer_thresholds():
    """Decode tokens through the Triton kernels (interpreter on a CPU) with a per-layer allocation equal
    the reference path's output."""
    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", [0.3, 0.7], calibration=CAL, progress=False, kernels="off")
    step = IDS[:, :1]
    with torch.no_grad():
        reference = model(step).logits
        countdown.set_kernels(model, "always")
        assert ffn.sparse_modules(model)[0].kernel_skip_reason(torch.zeros(1, 1, 32)) is None
        kernel = model(step).logits
    countdown.unsparsify(model)
    torch.testing.assert_close(kernel, reference, rtol=1e-4, atol=1e-4)
