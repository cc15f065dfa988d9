"""Lookahead row prefetch in the offloaded path (`offload(..., overlap=True)`), on the CPU: the worker,
index split, gathers and copies run as on a GPU (no side stream); results must equal the resident
lookahead model's, and the rows copied must be the host part of the lookahead predictor's kept set."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers as tf

import countdown
from countdown.lookahead import remove_lookahead, train_lookahead, use_lookahead
from countdown.offload import (
    host_bytes_live,
    offload,
    offload_state,
    overlap_rows,
    plan_resident,
    unoffload,
)
from countdown.overlap import RowPrefetcher
from countdown.predictor import logits_of
from tests.tiny_models import _GATED_COMMON, VOCAB, tiny_model

ROW_BYTES = 3 * 32 * 4  # gate, up, down rows of one neuron, H = 32, float32


def _model(layers: int = 4):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**_GATED_COMMON, "num_hidden_layers": layers})).eval()


def _lookahead_model(source: str, layers: int = 4, **sparsify_kwargs):
    model = _model(layers)
    calib = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    preds = train_lookahead(model, 0.7, calib, source=source, rank=8, epochs=2)
    countdown.sparsify(model, "d-countdown", 0.7, predictors=preds, progress=False,
                       **({"mode": "topk"} | sparsify_kwargs))
    use_lookahead(model, source)
    return model


def _budget(model, hot: int, block_rows: int = 8) -> int:
    return plan_resident(model, reserve=0, block_rows=block_rows, overlap=True)["minimum"] + hot * ROW_BYTES


@pytest.mark.parametrize("source", ["attention", "previous"])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_overlap_greedy_tokens_equal_resident(source, mode):
    kwargs = {} if mode == "topk" else {"mode": "threshold",
                                       "calibration": torch.randint(0, VOCAB, (4, 24),
                                                                    generator=torch.Generator().manual_seed(5))}
    model = _lookahead_model(source, **kwargs)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = countdown.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    offload(model, "cpu", _budget(model, 60), reserve=0, block_rows=8, overlap=True)
    state = offload_state(model)
    assert state.overlap_note.startswith("CPU device")
    out = countdown.generate(model, ids, max_new_tokens=8, eos_token_id=[])
    stats = state.stats()
    unoffload(model)
    assert torch.equal(ref, out)
    assert stats.steps == 4 * 7  # 4 layers x 7 decode steps, every one served from a prefetch
    assert 0 < stats.rows_prefetched <= stats.rows_moved
    assert stats.bytes_moved == stats.rows_moved * ROW_BYTES
    assert 0 < stats.hit_rate < 1


def test_rows_copied_are_the_lookahead_kept_host_rows():
    model = _lookahead_model("attention")
    ffn0 = model.model.layers[0].mlp
    weights = (ffn0.gate_weight().clone(), ffn0.up_weight().clone(), ffn0.down_t().clone())
    predictor = {k: getattr(ffn0, f"predictor_{k}").clone() for k in ("V", "U", "b")}
    offload(model, "cpu", _budget(model, 20, block_rows=16), reserve=0, block_rows=16, overlap=True)
    state = offload_state(model)
    prefetcher = state.prefetcher  # slots of 32 rows: room for all 22 kept neurons of a token
    seen = {}
    norm_out = {}
    handle = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, out: norm_out.update(x=out))
    gather = prefetcher._gather

    def spy(layer, slot, host_mask, ready):
        got = gather(layer, slot, host_mask, ready)
        if layer == 0:
            seen.update(got=got, rows=got.rows.clone(), cold=got.cold_ids.clone(), hot=got.hot_ids.clone())
        return got

    prefetcher._gather = spy
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # a prefill: dense, nothing prefetched
            assert not seen and not prefetcher.pending
            model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    finally:
        handle.remove()
    layer = state.layers[0]
    expected = ffn0.masker("coef", logits_of(predictor, norm_out["x"].reshape(-1, 32)))[0] != 0
    cold = expected & ~layer.is_hot
    torch.testing.assert_close(seen["cold"], cold.nonzero().flatten())
    torch.testing.assert_close(seen["hot"], (expected & layer.is_hot).nonzero().flatten())
    for j, neuron in enumerate(seen["cold"].tolist()):  # the copied rows are that neuron's gate, up, down
        for m, w in enumerate(weights):
            torch.testing.assert_close(seen["rows"][j, m], w[neuron])
    assert 0 < len(seen["cold"]) == layer.stats.rows_prefetched  # the prefill streamed every host row once more
    assert layer.stats.rows_moved == len(seen["cold"]) + layer.cold_rows.shape[0]
    assert expected.sum() == 72 - int(72 * 0.7)
    unoffload(model)


def test_slot_overflow_takes_the_inline_chunks():
    model = _lookahead_model("previous")
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    ref = countdown.generate(model, ids, max_new_tokens=5, eos_token_id=[])
    # block_rows 2 -> slots of 4 rows; no hot neurons: ~21 kept host rows per layer and step overflow them
    offload(model, "cpu", _budget(model, 0, block_rows=2), reserve=0, block_rows=2, cache=False, overlap=True)
    state = offload_state(model)
    assert state.prefetcher.slots[0].capacity == overlap_rows(2) == 4
    out = countdown.generate(model, ids, max_new_tokens=5, eos_token_id=[])
    stats = state.stats()
    unoffload(model)
    assert torch.equal(ref, out)
    assert 0 < stats.rows_prefetched < stats.rows_moved and stats.kept_resident == 0


def test_lookahead_removed_while_offloaded_falls_back_inline():
    model = _lookahead_model("attention")
    offload(model, "cpu", _budget(model, 30), reserve=0, block_rows=8, overlap=True)
    remove_lookahead(model)  # the in-place predictor again: nothing can be started early
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    out = countdown.generate(model, ids, max_new_tokens=4, eos_token_id=[])
    stats = offload_state(model).stats()
    assert stats.steps == 4 * 3 and stats.rows_prefetched == 0 and stats.rows_moved > 0
    unoffload(model)
    assert torch.equal(out, countdown.generate(model, ids, max_new_tokens=4, eos_token_id=[]))


def test_overlap_needs_lookahead_d_countdown():
    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", 0.5, mode="topk", progress=False)
    with pytest.raises(ValueError, match="known only from the FFN's own input"):
        offload(model, "cpu", "1GiB", reserve=0, overlap=True)
    assert offload_state(model) is None
    model = _lookahead_model("attention", layers=2)
    remove_lookahead(model)
    with pytest.raises(ValueError, match=r"needs lookahead predictors in use.*None"):
        offload(model, "cpu", "1GiB", reserve=0, overlap=True)
    use_lookahead(model, "ffn")
    with pytest.raises(ValueError, match="needs lookahead predictors in use.*'ffn'"):
        offload(model, "cpu", "1GiB", reserve=0, overlap=True)
    with pytest.raises(ValueError, match="in-place predictor"):
        RowPrefetcher(model, [], torch.device("cpu"), 4, lambda *a: None)
    with pytest.raises(TypeError, match="overlap must be True or False"):
        offload(model, "cpu", "1GiB", reserve=0, overlap="yes")
    assert offload_state(model) is None
    # the slots are in the plan: a budget without them is refused, naming the minimum
    plain = plan_resident(model, reserve=0, block_rows=8)["minimum"]
    remove_lookahead(model)
    use_lookahead(model, "attention")
    with pytest.raises(ValueError, match="below the resident part"):
        offload(model, "cpu", plain, reserve=0, block_rows=8, overlap=True)


def test_unoffload_removes_hooks_worker_and_host_buffers():
    model = _lookahead_model("previous")
    gc.collect()
    before = host_bytes_live()
    hooks = [len(layer.mlp._forward_pre_hooks) + len(layer.input_layernorm._forward_hooks)
             for layer in model.model.layers]
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    for _ in range(3):
        offload(model, "cpu", _budget(model, 30), reserve=0, block_rows=8, overlap=True)
        worker = offload_state(model).prefetcher.worker
        countdown.generate(model, ids, max_new_tokens=3, eos_token_id=[])
        unoffload(model)
        assert worker._shutdown
    gc.collect()
    assert host_bytes_live() == before
    assert [len(layer.mlp._forward_pre_hooks) + len(layer.input_layernorm._forward_hooks)
            for layer in model.model.layers] == hooks
