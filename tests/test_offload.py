"""Offloaded decode on the CPU: the "device" is the CPU too, so the split, index, gather and copy logic
runs exactly as on a GPU (copies are plain copies); greedy tokens must equal the resident model's."""

from __future__ import annotations

import gc
import re

import pytest
import torch

import countdown
from countdown.data import calibration_text, first_tokens
from countdown.hot import keep_frequencies
from countdown.offload import (ROUTES, format_bytes, host_bytes_live, offload, offload_state, parse_bytes,
                               plan_resident, unoffload)
from tests.tiny_models import VOCAB, tiny_model


def _sparsified(method: str, arch: str = "llama", **kwargs):
    model = tiny_model(arch)
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    if method == "d-countdown":
        preds = countdown.train_predictors(model, 0.5, calibration=calib, rank=8, epochs=2, progress=False)
        countdown.sparsify(model, method, 0.5, calibration=calib, predictors=preds, progress=False, **kwargs)
    elif method != "dense":
        countdown.sparsify(model, method, 0.5, calibration=calib, progress=False, **kwargs)
    return model


def _minimum(model, **kwargs) -> int:
    return plan_resident(model, **kwargs)["minimum"]


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("method", list(ROUTES))
def test_offloaded_greedy_tokens_equal_resident(method, arch):
    model = _sparsified(method, arch)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = countdown.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    row_bytes = len(ROUTES[method][1]) * model.config.hidden_size * 4
    # room for 40 of the 144 neurons: most kept rows come from the host
    offload(model, "cpu", _minimum(model, reserve=0, block_rows=8) + 40 * row_bytes, reserve=0, block_rows=8)
    state = offload_state(model)
    assert state.hot_neurons == 40
    assert sum(layer.hot_ids.numel() for layer in state.layers) == 40
    out = countdown.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(ref, out)
    stats = state.stats()
    assert stats.rows_moved > 0 and stats.bytes_moved == stats.rows_moved * row_bytes
    if method != "dense":
        assert stats.steps == 2 * 7  # 2 layers x (7 decode steps; the prefill is dense, streamed)
        assert 0 < stats.hit_rate < 1
    unoffload(model)


def test_sparse_prefill_and_topk_mode_match_resident():
    model = _sparsified("m-countdown", mode="topk", positions="all")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        offload(model, "cpu", _minimum(model, reserve=0) + 10_000, reserve=0, block_rows=5)
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert offload_state(model).stats().tokens == 2 * 9  # every position went through the sparse route
    unoffload(model)


def test_sparse_step_moves_only_kept_host_rows():
    model = _sparsified("cats")
    offload(model, "cpu", "1GiB", reserve=0, block_rows=16, cache=False)  # nothing hot
    state = offload_state(model)
    x = torch.randn(1, 1, model.config.hidden_size)
    layer = state.layers[0]
    with torch.no_grad():
        layer.forward(x)
        a = model.model.layers[0].mlp.act_fn(torch.nn.functional.linear(x, layer.dense))
        kept = int((a.abs() > layer.module.threshold("coef")).sum())
    assert layer.stats.rows_moved == kept < layer.intermediate
    assert layer.stats.hit_rate == 0.0
    unoffload(model)


def test_state_dict_unchanged_and_unoffload_restores():
    model = _sparsified("d-countdown")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = type(model.model.layers[0].mlp).forward
    offload(model, "cpu", "1GiB", reserve=0)
    during = model.state_dict()
    assert list(during) == list(before) and all(torch.equal(during[k], v) for k, v in before.items())
    unoffload(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert offload_state(model) is None
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert type(model.model.layers[0].mlp).forward is forward
    countdown.unsparsify(model)  # still an ordinary sparsified model
    assert not countdown.is_sparsified(model)


def test_repeated_offload_does_not_leak_host_buffers():
    model = _sparsified("m-countdown")
    gc.collect()
    base = host_bytes_live()
    sizes = []
    for _ in range(4):
        offload(model, "cpu", _minimum(model, reserve=0) + 20_000, reserve=0, block_rows=8)
        sizes.append(host_bytes_live() - base)
        assert sizes[-1] == offload_state(model).host_bytes() > 0
        unoffload(model)
        gc.collect()
        assert host_bytes_live() == base
    assert len(set(sizes)) == 1


def test_hot_set_follows_frequencies():
    model = _sparsified("m-countdown")
    inter = model.config.intermediate_size
    freqs = [torch.zeros(inter), torch.zeros(inter)]
    freqs[1][[3, 5, 7]] = 1.0  # the three most frequent neurons, all in layer 1
    freqs[0][11] = 0.5
    row_bytes = 2 * model.config.hidden_size * 4
    offload(model, "cpu", _minimum(model, reserve=0) + 4 * row_bytes, reserve=0, frequencies=freqs)
    layers = offload_state(model).layers
    assert sorted(layers[1].hot_ids.tolist()) == [3, 5, 7] and layers[0].hot_ids.tolist() == [11]
    unoffload(model)
    with pytest.raises(ValueError, match="frequencies must be 2 tensors of 72"):
        offload(model, "cpu", "1GiB", reserve=0, frequencies=[torch.zeros(5)])


def test_bad_input_gets_clear_errors():
    model = _sparsified("teal")
    with pytest.raises(ValueError, match="offload serves dense models and the methods"):
        offload(model, "cpu", "1GiB")
    model = _sparsified("cats")
    minimum = _minimum(model, reserve="1MiB")
    with pytest.raises(ValueError, match=re.escape(f"{format_bytes(minimum)} minimum ({minimum} bytes")):
        offload(model, "cpu", minimum - 1, reserve="1MiB")
    offload(model, "cpu", minimum, reserve="1MiB", cache=False)
    assert offload_state(model).hot_neurons == 0
    unoffload(model)
    with pytest.raises(ValueError, match="cannot read memory size"):
        offload(model, "cpu", "eight gigs")
    with pytest.raises(ValueError, match="not offloaded"):
        unoffload(model)
    offload(model, "cpu", "1GiB", reserve=0)
    with pytest.raises(ValueError, match="already offloaded"):
        offload(model, "cpu", "1GiB")
    unoffload(model)
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("1.5 MB") == 1_500_000 and parse_bytes(7) == 7
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU"):
            offload(model, "cuda", "1GiB")


def test_smollm2_offloaded_greedy_equals_resident(smollm2):
    model, tok = smollm2
    calib = first_tokens(tok, calibration_text(), 512, 128)
    countdown.sparsify(model, "m-countdown", 0.7, calibration=calib, progress=False)
    try:
        freqs = keep_frequencies(model, calib)
        ids = torch.tensor([tok.encode("The capital of France is")])
        ref = countdown.generate(model, ids, max_new_tokens=12, eos_token_id=[])
        # a quarter of the FFN neurons resident (M-COUNTDOWN: gate and down rows per neuron)
        sites = countdown.ffn_sites(model)
        quarter = len(sites) * sites[0].intermediate_size // 4 * 2 * sites[0].hidden_size * 4
        offload(model, "cpu", _minimum(model, reserve=0) + quarter, reserve=0, frequencies=freqs)
        try:
            out = countdown.generate(model, ids, max_new_tokens=12, eos_token_id=[])
            stats = offload_state(model).stats()
        finally:
            unoffload(model)
        assert torch.equal(ref, out)
        assert stats.rows_moved > 0 and 0.25 < stats.hit_rate < 1.0  # hot neurons beat their 25% share
    finally:
        countdown.unsparsify(model)


def test_untied_input_embedding_stays_on_the_host():
    model = _sparsified("cats")  # tiny Llama: the LM head has its own weight
    emb = model.get_input_embeddings()
    auto, device = plan_resident(model, reserve=0), plan_resident(model, reserve=0, embeddings="device")
    assert auto["host_embedding"] is emb and device["host_embedding"] is None
    assert device["minimum"] - auto["minimum"] == emb.weight.numel() * emb.weight.element_size()
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        offload(model, "cpu", "1GiB", reserve=0)
        assert "forward" in emb.__dict__
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    unoffload(model)
    assert "forward" not in emb.__dict__
    tied = tiny_model("llama")
    tied.lm_head.weight = tied.get_input_embeddings().weight
    with pytest.raises(ValueError, match="shares the input embedding"):
        plan_resident(tied, embeddings="host")
    assert plan_resident(tied)["host_embedding"] is None
