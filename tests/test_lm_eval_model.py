"""countdown as an lm-eval model by name: ``simple_evaluate(model="countdown", ...)`` on a tiny random-weight
Llama checkpoint (with the real SmolLM2 tokenizer) and one of the packaged offline BIG-bench tasks."""

from __future__ import annotations

import pytest
import torch
import transformers

import countdown
from countdown.methods import keep_count
from tiny_models import tokens

lm_eval = pytest.importorskip("lm_eval")
from countdown.lm_eval_model import CountdownLM  # noqa: E402  (registers "countdown")
from countdown.tasks import evaluate_tasks, task_manager  # noqa: E402

TASK = "countdown_bigbench_emoji_movie_cloze"
LIMIT = 4
INTER = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=INTER,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _evaluate(model, model_args: str = ""):
    return lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=[TASK], limit=LIMIT,
                                   task_manager=task_manager(), log_samples=True)


def _loglikelihoods(out) -> list[float]:
    return [float(ll) for sample in out["samples"][TASK] for ll, _ in sample["filtered_resps"]]


def _in_memory(checkpoint, **sparsify):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if sparsify:
        countdown.sparsify(model, **sparsify)
    return model


@pytest.mark.parametrize("positions", ["decode", "all"])
def test_by_name_equals_the_in_memory_model_and_reports_sparsity(checkpoint, smollm2_tokenizer, positions):
    args = f"pretrained={checkpoint},method=m-countdown,sparsity=0.7,positions={positions},device=cpu"
    out = _evaluate("countdown", args)
    report = out["config"]["countdown"]
    assert (report["method"], report["target_sparsity"], report["mode"], report["positions"]) == \
        ("m-countdown", 0.7, "topk", positions)
    assert report["measured"]["sparsity"] == pytest.approx(1 - keep_count(INTER, 0.7) / INTER)
    counts = report["tasks"][TASK]
    if positions == "decode":  # the first continuation token of each request is predicted by its dense context
        assert 0 < counts["dense_scored_tokens"] < counts["scored_tokens"]
    else:
        assert counts["dense_scored_tokens"] == 0 < counts["scored_tokens"]

    # the same configuration in memory: the lm-eval class on a model object, and what
    # `countdown eval --tasks` runs (evaluate_tasks)
    config = dict(method="m-countdown", sparsity=0.7, mode="topk", positions=positions)
    model = _in_memory(checkpoint, **config)
    same = _evaluate(CountdownLM(model, tokenizer=smollm2_tokenizer, batch_size=1))
    assert _loglikelihoods(same) == pytest.approx(_loglikelihoods(out), rel=1e-6, abs=1e-6)
    mine = evaluate_tasks(model, smollm2_tokenizer, [TASK], limit=LIMIT)[TASK]
    assert mine["acc"] == out["results"][TASK]["acc,none"]
    assert mine["acc_norm"] == out["results"][TASK]["acc_norm,none"]
    assert mine["dense_scored"] == pytest.approx(counts["dense_scored"])
    assert mine["sparsity"] == pytest.approx(report["measured"]["sparsity"])
    # and the sparsity was applied: a dense model scores otherwise
    dense = _evaluate(CountdownLM(_in_memory(checkpoint), tokenizer=smollm2_tokenizer))
    assert dense["config"]["countdown"] == {"method": "dense"}
    assert max(abs(a - b) for a, b in zip(_loglikelihoods(dense), _loglikelihoods(out))) > 1e-3


def test_sparsity_file_and_a_sparse_save_pretrained_folder(checkpoint, smollm2_tokenizer, tmp_path):
    model = _in_memory(checkpoint, method="cats", sparsity=0.6, calibration=tokens(4, 24), positions="decode",
                       progress=False)
    artifact = countdown.save_sparsity(model, tmp_path / "cats.safetensors")
    expected = _loglikelihoods(_evaluate(CountdownLM(model, tokenizer=smollm2_tokenizer)))

    out = _evaluate("countdown", f"pretrained={checkpoint},sparsity_file={artifact},device=cpu")
    report = out["config"]["countdown"]
    assert (report["method"], report["mode"], report["sparsity_file"]) == ("cats", "threshold", str(artifact))
    assert _loglikelihoods(out) == pytest.approx(expected, rel=1e-6, abs=1e-6)

    # a checkpoint saved from the sparsified model brings its sparsity back by itself
    model.save_pretrained(tmp_path / "sparse-ckpt")
    smollm2_tokenizer.save_pretrained(tmp_path / "sparse-ckpt")
    out = _evaluate("countdown", f"pretrained={tmp_path / 'sparse-ckpt'},device=cpu")
    assert out["config"]["countdown"]["method"] == "cats"
    assert _loglikelihoods(out) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_bad_lm_eval_model_arguments_are_named(checkpoint, smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        CountdownLM(_in_memory(checkpoint))
    with pytest.raises(ValueError, match="not both"):
        CountdownLM(str(checkpoint), sparsity_file=str(tmp_path / "x.safetensors"), method="cats", device="cpu")
    with pytest.raises(ValueError, match="calibration="):
        CountdownLM(str(checkpoint), method="cats", calibration="no-such-corpus", device="cpu")
