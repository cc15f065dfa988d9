"""countdown.tasks: offline lm-eval tasks and the in-memory-model adapter."""

from __future__ import annotations

import json
import math
import sys

import pytest

from countdown import tasks as ct


def test_available_tasks_ship_real_data() -> None:
    names = ct.available_tasks()
    assert len(names) >= 3
    assert all(n.startswith(ct.LOCAL_PREFIX) for n in names)
    manifest = json.loads((ct.TASKS_DIR / "MANIFEST.json").read_text())
    assert {v for info in manifest["tasks"].values() for v in info["variants"]} == set(names)
    assert any(n.endswith("_cloze") for n in names)
    for info in manifest["tasks"].values():
        rows = [json.loads(line) for line in (ct.TASKS_DIR / f"bigbench_{info['bigbench_task']}" / "test.jsonl").open()]
        assert len(rows) == info["examples_shipped"] > 0
        for r in rows:
            assert r["targets"][0] in r["multiple_choice_targets"]
            assert r["cloze_inputs"] and "choice:" not in r["cloze_inputs"]
            assert len(r["multiple_choice_targets"]) == len(r["multiple_choice_scores"]) >= 2


def test_evaluate_local_task_on_tiny_llama(smollm2_tokenizer) -> None:
    pytest.importorskip("lm_eval")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).eval()
    names = ct.available_tasks()
    mc = next(n for n in names if not n.endswith("_cloze"))
    tasks = [mc, mc + "_cloze"]  # both prompt forms of one data file
    res = ct.evaluate_tasks(model, smollm2_tokenizer, tasks, limit=4, batch_size=4)
    assert sorted(res) == sorted(tasks)
    for r in res.values():
        assert set(r) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
        assert r["n"] == 4
        for key in ("acc", "acc_norm"):
            assert 0.0 <= r[key] <= 1.0 and (r[key] * 4) == round(r[key] * 4)  # k correct out of 4
        assert r["acc_stderr"] >= 0 and not math.isnan(r["acc_stderr"])


@pytest.mark.parametrize("name", ["countdown_no_such_task", "no_such_task_in_lm_eval_either"])
def test_unknown_task_lists_available(name) -> None:
    pytest.importorskip("lm_eval")  # the second name makes lm-eval index its own ~15k tasks (~10 s)
    with pytest.raises(ValueError) as err:
        ct.evaluate_tasks(object(), object(), [name])
    assert name in str(err.value)
    for local in ct.available_tasks():
        assert local in str(err.value)


@pytest.mark.parametrize("bad", ["countdown_bigbench_hyperbaton", [], [3]])
def test_tasks_must_be_a_list_of_names(bad) -> None:
    with pytest.raises(ValueError, match="list of task names"):
        ct.evaluate_tasks(object(), object(), bad)


def test_missing_lm_eval_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match="pip install"):
        ct.evaluate_tasks(object(), object(), [ct.available_tasks()[0]])


def test_local_tag_runs_every_task_of_one_form(smollm2_tokenizer) -> None:
    pytest.importorskip("lm_eval")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(smollm2_tokenizer), max_position_embeddings=1024)
    res = ct.evaluate_tasks(LlamaForCausalLM(cfg).eval(), smollm2_tokenizer, ["countdown_cloze"], limit=2, batch_size=8)
    assert sorted(res) == [n for n in ct.available_tasks() if n.endswith("_cloze")]
    assert all(r["n"] == 2 for r in res.values())
