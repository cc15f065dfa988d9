"""The evaluation protocol: count rule, ties, threshold rule, positions (lm-eval included), and that
every artifact, sweep point and table names it."""

from __future__ import annotations

import json

import pytest
import torch

import countdown
from countdown import artifact, ffn
from countdown.calibrate import Calibration, ScoreRecorder, per_forward_kth, site_threshold
from countdown.methods import keep_count
from countdown.spec import topk_mask
from tiny_models import INTER, tiny_model, tokens


# -- count rule ------------------------------------------------------------------------------------
def test_count_rule_floor_is_official_int_and_differs_from_round():
    # 0.8 x 14336 = 11468.8: the official code drops int() = 11468, round() would drop 11469
    assert keep_count(14336, 0.8) == keep_count(14336, 0.8, "floor") == 14336 - 11468
    assert keep_count(14336, 0.8, "round") == 14336 - 11469
    assert keep_count(72, 0.3) == 72 - 21 and keep_count(72, 0.3, "round") == 72 - 22  # 21.6
    assert keep_count(72, 0.0) == 72  # sparsity 0 is dense (no official max(1, .))
    with pytest.raises(ValueError, match="count rule"):
        keep_count(72, 0.3, "ceil")


def test_topk_mode_drops_floor_count_per_token_end_to_end():
    model, ids = tiny_model("llama"), tokens(2, 16)
    for rule, dropped in (("floor", 21), ("round", 22)):  # 0.3 x 72 = 21.6
        countdown.sparsify(model, "cats", 0.3, mode="topk", count_rule=rule)
        r = countdown.perplexity(model, ids.reshape(-1), context=16, progress=False)
        countdown.unsparsify(model)
        assert all(abs(s - dropped / INTER) < 1e-9 for s in r.layer_sparsity), (rule, r.layer_sparsity)


# -- ties ------------------------------------------------------------------------------------------
def test_strict_ties_drop_every_score_equal_to_the_kth():
    score = torch.tensor([[1.0, 2.0, 2.0, 2.0, 3.0, 4.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    # k = int(6 * 0.5) = 3 dropped; the 3rd smallest of row 0 is 2, tied three times
    strict = topk_mask(score, 0.5, ties="strict")
    assert strict.tolist() == [[0, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]]
    exact = topk_mask(score, 0.5, ties="exact")
    assert exact.sum(-1).tolist() == [3, 3] and exact[0, 4:].tolist() == [1, 1]
    assert topk_mask(score, 0.0, ties="strict").eq(1).all()  # nothing dropped at sparsity 0


def test_strict_ties_keep_fewer_than_nominal_in_bf16():
    g = torch.Generator().manual_seed(0)
    score = (torch.randn(64, 1000, generator=g) * 0.05).abs().to(torch.bfloat16)  # few distinct bf16 values
    strict, exact = topk_mask(score, 0.7, ties="strict"), topk_mask(score, 0.7, ties="exact")
    nominal = keep_count(1000, 0.7)
    assert (exact.sum(-1) == nominal).all()
    assert (strict.sum(-1) <= nominal).all() and (strict.sum(-1) < nominal).any()
    kth = score.float().kthvalue(1000 - nominal, dim=-1, keepdim=True).values.to(torch.bfloat16)
    assert torch.equal(strict.bool(), score > kth)  # the official rule, verbatim


# -- threshold rules -------------------------------------------------------------------------------
def _hand_calibration() -> Calibration:
    # one layer, one site; rows of D = 4; forward 0 has two rows, forward 1 one, forward 2 one
    rows = torch.tensor([[4.0, 1.0, 3.0, 2.0],   # 2nd smallest: 2
                         [10.0, 20.0, 30.0, 40.0],  # 20
                         [0.5, 0.1, 0.2, 0.3],  # 0.2
                         [7.0, 5.0, 6.0, 8.0]])  # 6
    forwards = torch.tensor([0, 0, 1, 2])
    values = torch.arange(101, dtype=torch.float32)  # pooled quantiles are easy: q-quantile = 100 q
    return Calibration("cats", {}, ("coef",), [{"coef": values}], rows=[{"coef": rows}],
                       row_forwards=[{"coef": forwards}])


def test_threshold_rules_on_hand_made_scores():
    cal = _hand_calibration()
    # k = int(4 * 0.5) = 2: per-forward means of the 2nd smallest: (2 + 20) / 2 = 11, 0.2, 6
    assert per_forward_kth(cal.rows[0]["coef"], cal.row_forwards[0]["coef"], 0.5).tolist() == pytest.approx([11, 0.2, 6])
    assert cal.thresholds(0.5, "mean-kth")[0, 0] == pytest.approx((11 + 0.2 + 6) / 3)
    assert cal.thresholds(0.5, "median-kth")[0, 0] == pytest.approx(6)
    assert cal.thresholds(0.5, "pooled")[0, 0] == pytest.approx(50)
    assert cal.thresholds(0.5, "mean-kth", adjust=0.25)[0, 0] == pytest.approx((11 + 0.2 + 6) / 3 + 0.25)
    assert cal.thresholds(0.3, "pooled", adjust=-1.0)[0, 0] == pytest.approx(29)
    # count rule: 0.65 x 4 = 2.6 -> floor drops 2 (the 2nd smallest is the cut-off), round drops 3
    assert cal.thresholds(0.65, "mean-kth", count_rule="floor")[0, 0] == pytest.approx((11 + 0.2 + 6) / 3)
    assert cal.thresholds(0.65, "mean-kth", count_rule="round")[0, 0] == pytest.approx(((3 + 30) / 2 + 0.3 + 7) / 3)
    assert site_threshold(torch.zeros(3), None, None, 0.5) == 0.0  # pooled needs no rows
    with pytest.raises(ValueError, match="whole token rows"):
        site_threshold(torch.zeros(3), None, None, 0.5, "mean-kth")


def test_recorder_keeps_rows_and_their_forward():
    rec = ScoreRecorder()
    g = torch.Generator().manual_seed(0)
    calls = [torch.rand(2, 5, 7, generator=g), torch.rand(1, 3, 7, generator=g)]
    for score in calls:
        rec("coef", score)
    values, rows, forwards = rec.gathered("coef")
    assert rows.shape == (13, 7) and forwards.tolist() == [0] * 10 + [1] * 3
    assert torch.equal(rows, torch.cat([c.reshape(-1, 7) for c in calls]))  # under budget: every row
    # the official per-layer threshold: mean over forwards of the forward's mean per-token k-th
    official = torch.stack([c.reshape(-1, 7).kthvalue(int(7 * 0.6), dim=-1).values.mean() for c in calls]).mean()
    assert site_threshold(values, rows, forwards, 0.6, "mean-kth") == pytest.approx(float(official))
    small = ScoreRecorder()
    small.samples_per_call = 14  # two rows of 7 per call
    small("coef", calls[0])
    assert small.gathered("coef")[1].shape == (2, 7)


@pytest.mark.parametrize("rule", ["mean-kth", "median-kth"])
def test_sparsify_uses_the_threshold_rule(rule):
    model, ids = tiny_model("llama"), tokens(3, 16)
    cal = countdown.calibrate(model, "m-countdown", ids, progress=False)
    countdown.sparsify(model, "m-countdown", 0.6, calibration=cal, threshold_rule=rule, threshold_adjust=0.01,
                       positions="all")
    got = torch.stack([m.masker.thresholds.cpu() for m in ffn.sparse_modules(model)])
    torch.testing.assert_close(got, cal.thresholds(0.6, rule, 0.01))
    assert countdown.sparsity_spec(model).protocol == f"threshold {rule} floor +0.01, all"
    countdown.unsparsify(model)


def test_teal_second_site_follows_the_rule():
    model, ids = tiny_model("llama"), tokens(3, 16)
    cal = countdown.calibrate(model, "teal", ids, progress=False)
    countdown.sparsify(model, "teal", 0.5, calibration=cal, threshold_rule="mean-kth")
    got = torch.stack([m.masker.thresholds.cpu() for m in ffn.sparse_modules(model)])
    countdown.unsparsify(model)
    # the input site is the first pass's; the coefficient site is re-calibrated (masked input) by the same rule
    torch.testing.assert_close(got[:, 0], cal.thresholds(0.5, "mean-kth")[:, 0])
    assert not torch.allclose(got[:, 1], cal.thresholds(0.5, "mean-kth")[:, 1])


@pytest.mark.parametrize("bad", [dict(count_rule="ceil"), dict(ties="loose"), dict(threshold_rule="mean"),
                                 dict(threshold_adjust=float("nan")), dict(positions="prefill")])
def test_bad_protocol_options_are_named(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=next(iter(bad))):
        countdown.sparsify(model, "cats", 0.5, mode="topk", **bad)
    assert not countdown.is_sparsified(model)


def test_protocol_is_one_object_and_keywords_still_work():
    official = countdown.OFFICIAL_PROTOCOL
    assert isinstance(official, countdown.Protocol) and official == dict(official) and hash(official) == hash(
        countdown.Protocol(**official))
    as_object = countdown.sparsity_spec(countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk",
                                                           protocol=official))
    as_keywords = countdown.sparsity_spec(countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk",
                                                             **official))
    assert as_object == as_keywords and as_object.ties == "strict" and as_object.threshold_rule == "mean-kth"
    # a keyword overrides the object's option, the others stay; a plain dict serves as a protocol too
    mixed = countdown.sparsity_spec(countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk",
                                                       protocol=dict(official), ties="exact"))
    assert (mixed.ties, mixed.count_rule, mixed.positions, mixed.threshold_rule) == ("exact", "floor", "decode",
                                                                                     "mean-kth")
    default = countdown.sparsity_spec(countdown.sparsify(tiny_model("llama"), "cats", 0.5, mode="topk"))
    assert (default.positions, default.ties, default.threshold_rule) == ("decode", "exact", "pooled")


def test_protocol_refuses_bad_options_when_made():
    with pytest.raises(ValueError, match="ties must be one of"):
        countdown.Protocol(ties="loose")
    with pytest.raises(TypeError, match="the protocol options are positions, count_rule"):
        countdown.OFFICIAL_PROTOCOL.replace(tie="exact")
    model = tiny_model("llama")
    with pytest.raises(TypeError, match="unknown protocol option 'tie'"):
        countdown.sparsify(model, "cats", 0.5, mode="topk", tie="exact")
    assert not countdown.is_sparsified(model)


# -- artifact --------------------------------------------------------------------------------------
def test_artifact_round_trips_the_protocol(tmp_path):
    model, ids = tiny_model("llama"), tokens(2, 12)
    countdown.sparsify(model, "m-countdown", 0.55, mode="topk", **countdown.OFFICIAL_PROTOCOL)
    spec = countdown.sparsity_spec(model)
    assert (spec.positions, spec.count_rule, spec.ties, spec.threshold_rule) == ("decode", "floor", "strict", "mean-kth")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    path = countdown.save_sparsity(model, tmp_path / "s.safetensors")
    meta, _ = artifact.read(path)
    assert {k: meta[k] for k in countdown.OFFICIAL_PROTOCOL} == countdown.OFFICIAL_PROTOCOL
    again = countdown.load_sparsity(tiny_model("llama"), path)
    assert countdown.sparsity_spec(again) == spec
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref)


def test_artifact_without_protocol_loads_as_it_was_made(tmp_path):
    model = tiny_model("llama")
    countdown.sparsify(model, "cats", 0.3, mode="topk")
    path = countdown.save_sparsity(model, tmp_path / "s.safetensors")
    meta, tensors = artifact.read(path)
    legacy = {k: v for k, v in meta.items() if k not in ("format", "version", *countdown.OFFICIAL_PROTOCOL)}
    artifact.write(tmp_path / "old.safetensors", tensors, legacy)
    spec = countdown.sparsity_spec(countdown.load_sparsity(tiny_model("llama"), tmp_path / "old.safetensors"))
    assert (spec.positions, spec.count_rule, spec.ties, spec.threshold_rule) == ("all", "round", "exact", "pooled")


# -- per-row positions -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,method", [("llama", "m-countdown"), ("llama", "teal"), ("gpt2", "teal"),
                                         ("gpt2", "cats")])
def test_per_row_sparse_positions_match_per_forward_boundaries(arch, method):
    model, ids = tiny_model(arch), tokens(3, 10)
    countdown.sparsify(model, method, 0.6, mode="topk", positions="decode")
    modules = ffn.sparse_modules(model)
    starts, ends = [2, 5, 9], [10, 8, 10]  # row 1 ends at 8: padding after it stays dense
    mask = torch.zeros(3, 10, dtype=torch.bool)
    for b, (s, e) in enumerate(zip(starts, ends)):
        mask[b, s:e] = True
    meters = [ffn.SparsityMeter() for _ in modules]
    for m, meter in zip(modules, meters):
        m.sparse_positions, m.meter = mask, meter
    with torch.no_grad():
        batched = model(input_ids=ids).logits
    for m in modules:
        m.sparse_positions, m.meter = None, None
    # the meter saw the marked positions only, each once
    assert all(meter.seen["coef"] == int(mask.sum()) * INTER for meter in meters)
    for b, (s, e) in enumerate(zip(starts, ends)):
        for m in modules:
            m.sparse_from = s
        with torch.no_grad():
            alone = model(input_ids=ids[b : b + 1, :e]).logits[0]
        torch.testing.assert_close(batched[b, :e], alone, rtol=1e-5, atol=1e-5)
    countdown.unsparsify(model)


# -- lm-eval -------------------------------------------------------------------------------------
def _requests(vocab: int, n: int = 6, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ctx = torch.randint(1, vocab, (3 + 2 * i,), generator=g).tolist()
        cont = torch.randint(1, vocab, (1 + i % 3,), generator=g).tolist()
        out.append(((f"c{i}", f"x{i}"), ctx, cont))
    return out


def _loglikelihoods(model, tokenizer, requests, batch_size=4):
    from countdown.lm_eval_model import CountdownLM

    lm = CountdownLM(model, tokenizer=tokenizer, batch_size=batch_size)
    return [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]


def _by_hand(model, requests, positions):
    """Each request alone, its context dense through the per-forward ``sparse_from`` (the perplexity
    code's mechanism), summing the continuation's log-probabilities."""
    out = []
    for _, ctx, cont in requests:
        ids = torch.tensor([ctx + cont[:-1]])
        for m in ffn.sparse_modules(model):
            m.sparse_from = len(ctx) if positions == "decode" else None
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out.append(float(logp[len(ctx) - 1 :].gather(-1, torch.tensor(cont)[:, None]).sum()))
    for m in ffn.sparse_modules(model):
        m.sparse_from = None
    return out


def test_lm_eval_decode_positions_keep_each_context_dense(smollm2_tokenizer):
    pytest.importorskip("lm_eval")
    model = tiny_model("llama")
    requests = _requests(97)
    dense = _loglikelihoods(model, smollm2_tokenizer, requests)
    countdown.sparsify(model, "m-countdown", 0.8, mode="topk", positions="decode")
    decode = _loglikelihoods(model, smollm2_tokenizer, requests)
    assert decode == pytest.approx(_by_hand(model, requests, "decode"), rel=1e-5, abs=1e-5)
    for (_, _, cont), d, s in zip(requests, dense, decode):
        if len(cont) == 1:  # a one-token continuation is predicted by the last context position: dense
            assert s == pytest.approx(d, rel=1e-6, abs=1e-6)
    assert any(abs(s - d) > 1e-3 for (_, _, c), d, s in zip(requests, dense, decode) if len(c) > 1)
    countdown.unsparsify(model)
    countdown.sparsify(model, "m-countdown", 0.8, mode="topk", positions="all")
    strict = _loglikelihoods(model, smollm2_tokenizer, requests)
    assert strict == pytest.approx(_by_hand(model, requests, "all"), rel=1e-5, abs=1e-5)
    assert all(abs(s - d) > 1e-4 for d, s in zip(dense, strict))  # every position sparse: nothing equals dense


def test_evaluate_tasks_reports_dense_scored_fraction(smollm2_tokenizer):
    pytest.importorskip("lm_eval")
    from transformers import LlamaConfig, LlamaForCausalLM

    from countdown import tasks as ct

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    task = next(n for n in ct.available_tasks() if n.endswith("_cloze"))
    assert "dense_scored" not in ct.evaluate_tasks(model, smollm2_tokenizer, [task], limit=3)[task]  # dense model
    fractions = {}
    for positions in ("all", "decode"):
        countdown.sparsify(model, "cats", 0.5, mode="topk", positions=positions)
        fractions[positions] = ct.evaluate_tasks(model, smollm2_tokenizer, [task], limit=3)[task]["dense_scored"]
        countdown.unsparsify(model)
    assert fractions["all"] == 0.0
    # decode: one dense-predicted token per (context, choice) request, so 1 / mean continuation length
    assert 0.0 < fractions["decode"] <= 1.0
    print(f"\n{task}: fraction of scored tokens predicted by a dense position: {fractions}")


# -- paper tasks offline ---------------------------------------------------------------------------
def test_paper_tasks_name_their_datasets():
    pytest.importorskip("lm_eval")
    from countdown import tasks as ct

    needs = ct.task_datasets(["paper"])
    assert list(needs) == list(ct.PAPER_TASKS)
    assert needs["arc_easy"] == ["allenai/ai2_arc (config 'ARC-Easy')"]
    assert needs["gsm8k_cot"] == ["openai/gsm8k (config 'main')"]
    assert needs["hellaswag"] == ["Rowan/hellaswag"]
    assert ct.task_datasets(ct.available_tasks()) == {}  # the shipped tasks need nothing


def _offline(monkeypatch, tmp_path):
    import datasets.config
    from huggingface_hub import constants

    from countdown import tasks as ct

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    ct.hub_unreachable_reason.cache_clear()
    return ct


def test_offline_error_names_the_missing_datasets(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    ct = _offline(monkeypatch, tmp_path)
    try:
        with pytest.raises(ct.TaskDataUnavailable) as err:  # a ValueError: the CLI prints one line
            ct.evaluate_tasks(tiny_model("llama"), object(), ["paper"])
        message = str(err.value)
        for task, dataset in (("arc_challenge", "allenai/ai2_arc (config 'ARC-Challenge')"),
                              ("winogrande", "allenai/winogrande"), ("piqa", "baber/piqa"),
                              ("truthfulqa_mc1", "truthfulqa/truthful_qa"), ("gsm8k_cot", "openai/gsm8k")):
            assert f"{task} needs {dataset}" in message
        assert "HF_HUB_OFFLINE" in message and ct.available_tasks()[0] in message
        # a dataset in the local cache is not reported missing
        (tmp_path / "hub" / "datasets--allenai--ai2_arc").mkdir(parents=True)
        (tmp_path / "hub" / "datasets--allenai--ai2_arc" / "refs").mkdir()
        ct.check_task_data(["arc_easy", "arc_challenge"])
        with pytest.raises(ct.TaskDataUnavailable, match="gsm8k needs openai/gsm8k"):
            ct.check_task_data(["arc_easy", "gsm8k"])
    finally:
        ct.hub_unreachable_reason.cache_clear()


# -- sweep points and tables -----------------------------------------------------------------------
def test_sweep_points_and_tables_name_the_protocol(tmp_path):
    from countdown.report import markdown_table, tasks_markdown, write_files
    from countdown.sweep import load_points, run_grid

    model, ids = tiny_model("llama"), tokens(2, 16)
    results = tmp_path / "results.jsonl"
    official = {k: v for k, v in countdown.OFFICIAL_PROTOCOL.items()}
    points = run_grid(model, ["cats"], [0.5], ids, ids.reshape(-1), mode="topk", context=16, progress=False,
                      results_file=results, log=lambda s: None, **official)
    sparse = [p for p in points if p.method == "cats"][0]
    assert (sparse.count_rule, sparse.ties, sparse.positions) == ("floor", "strict", "decode")
    assert sparse.protocol == "top-k floor/strict ties, decode"
    table = markdown_table(points)
    assert "| protocol |" in table and "top-k floor/strict ties, decode" in table and "SP-ideal" in table
    sparse.extra = {"t": {"acc": 0.5, "acc_stderr": 0.1, "dense_scored": 0.25}}
    assert "25%–25%" in tasks_markdown(points)
    assert "protocol" in (write_files(points, tmp_path / "out")["csv"]).read_text().splitlines()[0]
    # a re-run with another protocol measures again; the same protocol resumes
    again = run_grid(model, ["cats"], [0.5], ids, ids.reshape(-1), mode="topk", context=16, progress=False,
                     results_file=results, log=lambda s: None, **{**official, "ties": "exact"})
    assert {p.protocol for p in again if p.method == "cats"} == {"top-k floor/strict ties, decode",
                                                                 "top-k floor/exact k, decode"}
    assert len(load_points(results)) == 3  # dense once, cats under two protocols
    # a results line from before the protocol was recorded reads as what it was measured with
    legacy = json.loads(results.read_text().splitlines()[1])
    for key in ("count_rule", "ties", "threshold_rule", "threshold_adjust"):
        legacy.pop(key)
    (tmp_path / "old.jsonl").write_text(json.dumps(legacy) + "\n")
    assert load_points(tmp_path / "old.jsonl")[0].count_rule == "round"


# -- document prefix (Gemma's <bos>) ---------------------------------------------------------------
@pytest.mark.parametrize("positions", ["all", "decode"])
def test_perplexity_prefix_goes_before_every_window_unscored(positions):
    import torch.nn.functional as F

    model, ids = tiny_model("llama"), tokens(1, 48).reshape(-1)
    bos, context = 3, 16
    countdown.sparsify(model, "cats", 0.5, mode="topk", positions=positions)
    got = countdown.perplexity(model, ids, context=context, prefix=[bos], progress=False)
    stride = context // 2 if positions == "decode" else context
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, n_scored in countdown.evaluate.score_spans(ids.numel(), context, stride,
                                                                    score_first_window=positions == "all"):
            window = torch.cat([torch.tensor([bos]), ids[begin:end]]).unsqueeze(0)
            for m in ffn.sparse_modules(model):
                m.sparse_from = window.shape[1] - n_scored if positions == "decode" else None
            logits = model(input_ids=window, use_cache=False).logits[0, :-1]
            nll += float(F.cross_entropy(logits[-n_scored:], window[0, 1:][-n_scored:], reduction="sum"))
            n += n_scored
    for m in ffn.sparse_modules(model):
        m.sparse_from = None
    countdown.unsparsify(model)
    without = countdown.perplexity(model, ids, context=context, positions=positions, progress=False)
    assert got.n_tokens == n  # the prefix is never a scored target; under "all" it lets each
    assert without.n_tokens == n - (3 if positions == "all" else 0)  # window's first token be scored
    assert got.nll == pytest.approx(nll / n, rel=1e-5)
    assert got.nll != pytest.approx(without.nll, rel=1e-5)


# -- plain forwards: generation prefill or scoring ---------------------------------------------------


def _cache_kwargs(model) -> dict:
    from transformers import DynamicCache

    from countdown.decode import _cache_argument

    return {_cache_argument(model): DynamicCache(config=model.config)}


@pytest.mark.parametrize("positions", ["all", "decode"])
def test_a_plain_forward_after_default_sparsify_is_sparse(positions, recwarn):
    """``model(ids)`` scores every position: it must differ from dense under both policies (under
    "decode" exactly as "all", i.e. as decoding the text token by token), and say nothing."""
    ids = tokens(2, 14)
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(ids).logits
        countdown.sparsify(model, positions=positions)  # the defaults: m-countdown 50%, top-k without calibration
        plain = model(ids).logits
        assert (plain - dense).abs().max() > 1e-3
        countdown.unsparsify(model)
        countdown.sparsify(model, positions="all")
        assert torch.equal(plain, model(ids).logits)
    assert not [w for w in recwarn if issubclass(w.category, ffn.DenseForwardWarning)]
    assert all(m.sparse_from is None for m in ffn.sparse_modules(model))  # nothing left behind


def test_decode_prefill_stays_dense_and_a_cached_scoring_forward_warns_once():
    ids = tokens(1, 14)
    model = tiny_model("llama")
    with torch.no_grad():
        dense = model(ids).logits
        countdown.sparsify(model, "m-countdown", 0.7, mode="topk", positions="decode")
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # generation prefill (last logits only, as model.generate and countdown.generate ask): dense
            torch.testing.assert_close(model(ids, logits_to_keep=1).logits[:, -1], dense[:, -1], rtol=1e-5, atol=1e-5)
            model.generate(ids, max_new_tokens=2, do_sample=False)
            assert not [w for w in caught if issubclass(w.category, ffn.DenseForwardWarning)]
            # a cache being filled with every position's logits: a prefill (dense), but it may be a
            # scoring loop, so it is said, once per model
            for _ in range(3):
                torch.testing.assert_close(model(ids, **_cache_kwargs(model)).logits, dense, rtol=1e-5, atol=1e-5)
        said = [w for w in caught if issubclass(w.category, ffn.DenseForwardWarning)]
        assert len(said) == 1 and "positions='all'" in str(said[0].message)
        assert "countdown.perplexity" in str(said[0].message)
        # "all" masks that forward too, and has nothing to say
        countdown.unsparsify(model)
        countdown.sparsify(model, "m-countdown", 0.7, mode="topk", positions="all")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (model(ids, **_cache_kwargs(model)).logits - dense).abs().max() > 1e-3
        assert not [w for w in caught if issubclass(w.category, ffn.DenseForwardWarning)]
        countdown.unsparsify(model)
        assert not model._forward_pre_hooks and not model._forward_hooks  # unsparsify removes the hooks


def test_evaluation_helpers_keep_their_own_positions_and_do_not_warn(recwarn):
    """countdown.perplexity's official protocol (context dense) is unchanged by the scoring rule."""
    ids = tokens(1, 40)[0]
    model = tiny_model("llama")
    countdown.sparsify(model, "m-countdown", 0.7, mode="topk", positions="decode")
    r = countdown.perplexity(model, ids, context=16, progress=False)
    # by hand: each window's context dense via sparse_from, as the helper does
    nll, n = 0.0, 0
    from countdown.evaluate import score_spans

    for begin, end, n_scored in score_spans(ids.numel(), 16, 8, score_first_window=False):
        window = ids[begin:end].unsqueeze(0)
        for m in ffn.sparse_modules(model):
            m.sparse_from = window.shape[1] - n_scored
        with torch.no_grad():
            logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits[-n_scored:], window[0, 1:][-n_scored:], reduction="sum"))
        n += n_scored
    for m in ffn.sparse_modules(model):
        m.sparse_from = None
    assert r.nll == pytest.approx(nll / n, rel=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, ffn.DenseForwardWarning)]
