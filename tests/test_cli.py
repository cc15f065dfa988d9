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
