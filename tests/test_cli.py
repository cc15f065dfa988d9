"""The `countdown` command end to end on a tiny random-weight Llama saved as a checkpoint folder
(with the real SmolLM2 tokenizer), on the packaged text."""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

from countdown.cli import app

runner = CliRunner()
SMALL = ["--text", "pydoc-topics", "--context", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smollm2_tokenizer):
    cfg = transformers.LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=72,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_run_prints_table_and_writes_plot(checkpoint, tmp_path):
    r = invoke("run", "--model", checkpoint, "--methods", "cats,m-countdown", "--sparsities", "0.5",
               "--calib-windows", "2", "--eval-tokens", "128", "--out", tmp_path, *SMALL)
    assert r.exit_code == 0, r.output
    assert "m-countdown" in r.output and "Δppl" in r.output
    assert (tmp_path / "ppl_vs_sparsity.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {row["method"] for row in rows} == {"dense", "cats", "m-countdown"}
    speed = (tmp_path / "speed.md").read_text()  # decode tokens/s and × dense beside every row's perplexity
    assert "decode tokens/s" in speed and "× dense" in r.output
    table = [line.split("|") for line in speed.splitlines() if line.startswith("| ") and "method" not in line]
    assert [cells[1].strip() for cells in table] == ["dense", "cats", "m-countdown"]
    assert float(table[0][5]) == 1.0 and all(float(cells[4]) > 0 for cells in table)


def test_sweep_resumes_instead_of_recomputing(checkpoint, tmp_path):
    args = ["sweep", "--model", checkpoint, "--methods", "teal", "--sparsities", "0.3,0.6",
            "--calib-windows", "2", "--eval-tokens", "128", "--out", tmp_path, *SMALL]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3  # dense + 2 points
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert "teal @" not in second.output  # nothing recomputed
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "summary.md").read_text().count("| teal |") == 2


def test_calibrate_then_eval_with_artifact(checkpoint, tmp_path):
    art = tmp_path / "a.safetensors"
    r = invoke("calibrate", "--model", checkpoint, "--method", "cats", "--sparsity", "0.5", "-o", art,
               "--calib-windows", "2", *SMALL)
    assert r.exit_code == 0, r.output
    r = invoke("eval", "--model", checkpoint, "--sparsity-file", art, "--eval-tokens", "128", *SMALL)
    assert r.exit_code == 0, r.output
    assert "measured sparsity" in r.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["eval", "--method", "nope"], "unknown method"),
        (["eval", "--method", "cats", "--sparsity", "1.2"], "[0, 1)"),
        (["eval", "--text", "no-such-corpus-or-file"], "neither a known corpus"),
        (["eval", "--sparsity-file", "missing.safetensors"], "no sparsity artifact"),
    ],
)
def test_bad_cli_input_is_a_clear_error(checkpoint, args, words):
    r = invoke(*args[:1], "--model", checkpoint, *args[1:], "--eval-tokens", "128", "--context", "64", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert words in r.output and "Traceback" not in r.output


# -- refused before anything loads -----------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test; the Hub's offline state is restored afterwards (the model-name
    check puts the process offline where the Hub cannot be reached)."""
    from huggingface_hub import constants

    from countdown import hub, loading

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load", loaded)
    monkeypatch.setattr(loading, "random_model", loaded)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    hub.unreachable_reason.cache_clear()
    yield
    hub.unreachable_reason.cache_clear()


OUT = ["-o", "unused.safetensors"]


@pytest.mark.parametrize(
    "args, words",
    [
        (["eval", "--method", "catz"], "unknown method 'catz'"),
        (["eval", "--method", "cats", "--sparsity", "1.5"], "[0, 1)"),
        (["eval", "--model", "nonexistent-model"], "is not a built-in model (smollm2"),
        (["eval", "--model", "no owner/no name"], "nor a Hugging Face Hub id"),
        (["eval", "--model", "./no/such/folder"], "model folder not found"),
        (["eval", "--model", "missing.gguf"], "GGUF file not found"),
        (["eval", "--model", "random:no-such-shape"], "unknown random model shape"),
        (["eval", "--text", "no-such-corpus-or-file"], "neither a known corpus"),
        (["eval", "--sparsity-file", "missing.safetensors"], "no sparsity artifact"),
        (["eval", "--sparsity-file", "a.safetensors", "--method", "cats"], "not both"),
        (["eval", "--method", "cats", "--positions", "middle"], "--positions must be one of"),
        (["eval", "--stride", "0"], "--stride must be at least 1"),
        (["eval", "--context", "64", "--stride", "65"], "--stride must be at most --context"),
        (["eval", "--eval-tokens", "1"], "--eval-tokens must be at least 2"),
        (["eval", "--method", "d-countdown"], "needs --predictors"),
        (["eval", "--method", "d-countdown", "--predictors", "missing.safetensors"], "--predictors: no such file"),
        (["eval", "--device", "nonsense"], "unknown device 'nonsense'"),
        (["eval", "--dtype", "float8"], "unknown dtype 'float8'"),
        (["run", "--methods", ""], "--methods is empty"),
        (["run", "--methods", "cats,catz"], "unknown method 'catz'"),
        (["run", "--sparsities", "0.5,x"], "could not parse"),
        (["run", "--sparsities", "1.0"], "[0, 1)"),
        (["run", "--mode", "fuzzy"], "unknown --mode 'fuzzy'"),
        (["run", "--positions", "middle"], "positions must be one of"),
        (["run", "--count-rule", "ceil"], "count_rule must be one of"),
        (["run", "--ties", "loose"], "ties must be one of"),
        (["run", "--threshold-adjust", "nan"], "finite number"),
        (["run", "--attention", "1.5"], "--attention: sparsity must be in [0, 1)"),
        (["run", "--calib-windows", "0"], "--calib-windows must be at least 1"),
        (["run", "--context", "1"], "--context must be at least 2"),
        (["sweep", "--threshold-rule", "median"], "threshold_rule must be one of"),
        (["sweep", "--task-limit", "0"], "--task-limit must be at least 1"),
        (["sweep", "--task-batch-size", "0"], "--task-batch-size must be at least 1"),
        (["calibrate", "--method", "catz", *OUT], "unknown method 'catz'"),
        (["calibrate", "--sparsity", "-0.1", *OUT], "[0, 1)"),
        (["calibrate", "--method", "d-countdown", *OUT], "needs --predictors"),
        (["calibrate", "--threshold-rule", "median", *OUT], "threshold_rule must be one of"),
        (["calibrate", "--method", "cats", "--threshold-rule", "zero", *OUT], "method 'cats' has no predictor"),
        (["eval", "--method", "chess"], "run `countdown calibrate --method chess`"),
        (["calibrate", "--model", "nonexistent-model", *OUT], "is not a built-in model (smollm2"),
        (["bench", "--methods", "catz"], "unknown method 'catz'"),
        (["bench", "--sparsities", "2"], "[0, 1)"),
        (["bench", "--max-seconds", "-1"], "--max-seconds must be at least 0"),
        (["bench", "--text", "no-such-corpus-or-file"], "neither a known corpus"),
        (["bench", "--model", "random:no-such-shape"], "unknown random model shape"),
        (["train-predictors", "--recipe", "mine", *OUT], "unknown predictor recipe 'mine'"),
        (["train-predictors", "--predictor", "dense", *OUT], "unknown predictor kind 'dense'"),
        (["train-predictors", "--rank", "-3", *OUT], "--rank must be 'auto' or a whole number"),
        (["train-predictors", "--sparsity", "1", *OUT], "[0, 1)"),
        (["train-predictors", "--calib-windows", "1", *OUT], "--calib-windows must be at least 2"),
        (["tune"], "give one budget: --bytes 0.65"),
        (["tune", "--bytes", "0.6", "--max-ppl-increase", "5%"], "give one budget"),
        (["tune", "--bytes", "1.5"], "--bytes must be a fraction of the dense step's bytes in (0, 1]"),
        (["tune", "--bytes", "0"], "--bytes must be a fraction"),
        (["tune", "--max-ppl-increase", "five"], "--max-ppl-increase must be a fraction (0.05) or a percentage"),
        (["tune", "--max-ppl-increase", "-5%"], "--max-ppl-increase must be above 0"),
        (["tune", "--bytes", "0.6", "--method", "catz"], "unknown method 'catz'"),
        (["tune", "--bytes", "0.6", "--method", "d-countdown"], "needs trained predictors, which tune does not train"),
        (["tune", "--bytes", "0.6", "--method", "dense"], "nothing to allocate"),
        (["tune", "--bytes", "0.6", "--search", "annealing"], "unknown --search 'annealing'"),
        (["tune", "--bytes", "0.6", "--search-windows", "0"], "--search-windows must be at least 1"),
        (["tune", "--max-ppl-increase", "5%", "--steps", "0"], "--steps must be at least 1"),
        (["tune", "--bytes", "0.6", "--text", "no-such-corpus-or-file"], "neither a known corpus"),
        (["tune", "--bytes", "0.6", "--model", "nonexistent-model"], "is not a built-in model (smollm2"),
    ],
)
def test_refused_before_any_model_loads(no_model_load, args, words):
    r = invoke(*args, "--device", "cpu") if "--device" not in args else invoke(*args)
    assert r.exit_code == 2, (r.output, r.exception)  # a load would have raised AssertionError: exit code 1
    assert words in " ".join(r.output.split()) and "Traceback" not in r.output


def test_unknown_model_names_the_builtins_and_why_the_hub_cannot_help(no_model_load):
    r = invoke("eval", "--model", "nonexistent-model", "--device", "cpu")
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and text.count("error:") == 1
    for name in ("smollm2", "qwen2.5-coder-0.5b", "gemma3-270m"):
        assert name in text
    from countdown import hub

    if hub.unreachable_reason(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) is None:
        assert "the Hugging Face Hub has no model of that name" in text
    else:  # no retries: the process went offline, so nothing later asks the Hub again
        assert "Hugging Face Hub is offline" in text
        import os

        from huggingface_hub import constants

        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE


def test_eval_tasks_equals_lm_eval_by_name(checkpoint):
    lm_eval = pytest.importorskip("lm_eval")
    import countdown.lm_eval_model  # noqa: F401  (registers "countdown")
    from countdown.tasks import task_manager

    task = "countdown_bigbench_emoji_movie_cloze"
    result = invoke("eval", "--model", checkpoint, "--method", "m-countdown", "--sparsity", "0.7", "--positions",
                    "decode", "--tasks", task, "--task-limit", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│ countdown_" in line)  # the row's first line
    cells = [c.strip() for c in row.split("│") if c.strip()]
    out = lm_eval.simple_evaluate(model="countdown", tasks=[task], limit=4, task_manager=task_manager(),
                                  model_args=f"pretrained={checkpoint},method=m-countdown,sparsity=0.7,"
                                             "positions=decode,device=cpu")
    assert float(cells[-4]) == pytest.approx(out["results"][task]["acc,none"], abs=5e-5)  # acc
    assert float(cells[-3]) == pytest.approx(out["results"][task]["acc_norm,none"], abs=5e-5)  # acc_norm
    assert cells[-2] == f"{out['config']['countdown']['measured']['sparsity']:.1%}"


def test_tune_prints_its_table_and_saves_a_model_that_loads_with_its_allocation(checkpoint, tmp_path):
    r = invoke("tune", "--model", checkpoint, "--method", "m-countdown", "--bytes", "0.997", "--search", "greedy",
               "--calib-windows", "2", "--search-windows", "1", "--search-len", "32", "--eval-tokens", "128",
               "--save", tmp_path / "tuned", *SMALL)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "0.997" in text and "Δppl" in text and "decode" in text and "saved to" in text
    import countdown

    model = countdown.from_pretrained(tmp_path / "tuned", kernels="off")
    spec = countdown.sparsity_spec(model)
    assert spec.method == "m-countdown" and spec.positions == "decode" and spec.allocation.n_layers == 2


def test_python_dash_m_knows_every_command():
    """`python -m countdown.cli` runs `main()` at the bottom of the module: commands registered after it
    (as `agreement` was) were unknown there while the `countdown` script knew them."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "countdown.cli", "agreement", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "greedy agreement" in done.stdout
