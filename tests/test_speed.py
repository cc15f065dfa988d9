"""`countdown bench` / `countdown.speed.measure_bench` on the CPU with tiny random-weight models:
dense beside every method at every batch size, speed-ups against that batch's dense, the routes,
memory and prefill table, the time guard and clear errors for bad batch sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from countdown.cli import app
from countdown.loading import RANDOM_SHAPES
from countdown.predictor import random_predictors
from countdown.report import bench_markdown, routes_markdown
from countdown.speed import BenchPlan, BenchResult, measure_bench, parse_batches
from tiny_models import tiny_model, tokens

runner = CliRunner()
TINY_SHAPE = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=512)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine their spin-waits cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    model = tiny_model("llama")
    preds = random_predictors(model)
    prompts = tokens(3, 10, seed=3)
    result = measure_bench(model, ["m-countdown", "d-countdown"], [0.5, 0.8], tokens(4, 24), batches=[1, 3],
                           prompt_for=lambda b: prompts[:b], new_tokens=4, repeats=1, predictors_for=lambda s: preds,
                           routes=True, route_tokens=2, prefill_len=16, prefill_repeats=1, log=lambda s: None)
    return result


def test_dense_beside_every_method_at_every_batch(bench):
    configs = [("dense", 0.0)] + [(m, s) for m in ("m-countdown", "d-countdown") for s in (0.5, 0.8)]
    for b in (1, 3):
        at_b = [p for p in bench.points if p.batch == b]
        assert [(p.method, p.target) for p in at_b] == configs  # dense first, then every configuration
        dense = at_b[0]
        assert dense.speedup == 1.0 and dense.match_dense == 1.0
        for p in at_b[1:]:  # against this batch's dense, not another batch's
            assert p.speedup == pytest.approx(p.tokens_per_s / dense.tokens_per_s)
            assert 0.0 < p.measured < 1.0
            assert p.call_tokens_per_s > 0 and p.generate_tokens_per_s > 0
            assert p.route == "eager" and not p.compiled
    assert all(not math.isnan(p.ideal_speedup) for p in bench.points if p.batch == 1)
    assert all(math.isnan(p.ideal_speedup) for p in bench.points if p.batch == 3)  # the union is unknown
    assert not bench.skipped


def test_first_batch_figures_per_configuration(bench):
    assert [(c.method, c.target) for c in bench.configs] == [(p.method, p.target) for p in bench.points if p.batch == 1]
    for c in bench.configs:
        assert c.prefill_ms > 0 and c.model_generate_tokens_per_s > 0
        assert math.isnan(c.memory_gib)  # CPU: no GPU memory to report
        assert (c.method == "dense") == math.isnan(c.prefill_all_ms)


def test_tables_batch_first_routes_last(bench):
    text = bench_markdown(bench, "tiny")
    batch_table, routes_table = text.index("| batch | route | method"), text.index("| what a user does |")
    assert batch_table < routes_table
    for column in ("tokens/s per sequence", "speed-up vs dense", "ideal (bytes, batch 1)", "GB/s", "GPU GiB",
                   "countdown.generate"):
        assert column in text[batch_table:routes_table]
    rows = [line for line in text[batch_table:routes_table].splitlines() if line.startswith("| 3 |")]
    assert len(rows) == 5 and "| dense |" in rows[0]
    routes = text[routes_table:]
    assert "plain `model.generate` (greedy, 2 new tokens)" in routes
    assert 'positions="all"' in routes and "GPU memory after `sparsify`" in routes
    quiet = BenchResult(bench.points, bench.configs, {**bench.settings, "routes": False})
    assert "model.generate" not in routes_markdown(quiet)  # only when asked for


def test_time_limit_leaves_out_and_says_so():
    model = tiny_model("llama")
    result = measure_bench(model, ["m-countdown"], [0.5], tokens(2, 24), batches=[1, 2],
                           prompt_for=lambda b: tokens(b, 8), new_tokens=3, repeats=1, prefill_len=0,
                           max_seconds=0.0, log=lambda s: None)
    assert result.points == [] and len(result.skipped) == 4
    assert "Left out (time limit 0s after model loading)" in bench_markdown(result)


@pytest.mark.parametrize("value, message", [("0", "out of range"), ("17", "out of range"), ("x", "whole numbers"),
                                            ("", "empty"), ("1,,x", "whole numbers")])
def test_bad_batch_values(value, message):
    with pytest.raises(ValueError, match=message):
        parse_batches(value)
    r = runner.invoke(app, ["bench", "--batch", value, "--device", "cpu"])
    assert r.exit_code == 2 and message in r.output


def test_parse_batches_keeps_order_and_single_values():
    assert parse_batches("4") == [4] and parse_batches(" 1, 2,2,16") == [1, 2, 16] and parse_batches(8) == [8]


def test_compile_batches_must_be_among_batches():
    r = runner.invoke(app, ["bench", "--batch", "1,2", "--compile", "--compile-batches", "4", "--device", "cpu"])
    assert r.exit_code == 2 and "not in --batch" in r.output


def test_cli_bench_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(RANDOM_SHAPES, "tiny-test", TINY_SHAPE)  # a Llama of a few dozen units, random weights
    out = tmp_path / "bench"
    r = runner.invoke(app, ["bench", "-m", "random:tiny-test", "--batch", "1,2", "--methods", "m-countdown,d-countdown",
                            "--sparsities", "0.7", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                            "--calib-windows", "2", "--prefill-len", "16", "--routes", "--route-tokens", "2",
                            "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "speed.json").read_text())
    assert [(p["batch"], p["method"]) for p in saved["points"]] == [
        (b, m) for b in (1, 2) for m in ("dense", "m-countdown", "d-countdown")]
    assert saved["settings"]["batches"] == [1, 2] and saved["device"] == "CPU"
    md = (out / "speed.md").read_text()
    assert "| batch | route | method" in md and "| what a user does |" in md
    assert r.output.rstrip().splitlines()[-1].startswith("| same, positions=\"all\"")  # the routes table prints last
    assert (out / "speedup.png").stat().st_size > 1000


def test_fused_qkv_bench_leaves_the_model_as_it_found_it():
    from countdown.attention import fused_attention_modules

    model = tiny_model("llama")
    logs: list[str] = []
    result = measure_bench(model, ["m-countdown"], [0.5], tokens(2, 24), batches=[1], prompt_for=lambda b: tokens(b, 8),
                           new_tokens=3, repeats=1, generate_repeats=0, prefill_len=0, fuse_qkv=True, log=logs.append)
    assert [p.method for p in result.points] == ["dense", "m-countdown"] and result.settings["fuse_qkv"]
    assert any("fused in 2 layers" in line for line in logs)
    assert not any(a.__dict__.get("_qkv_dense", False) for a in fused_attention_modules(model))


def test_bench_plan_is_checked_and_fitted_to_the_model():
    plan = BenchPlan(("m-countdown",), (0.5, 0.7), (2, 1, 2), compile_batches=(1,), prefill_len=4096)
    assert plan.batches == (2, 1) and plan.configs == [("dense", 0.0), ("m-countdown", 0.5), ("m-countdown", 0.7)]
    assert plan.for_model(tiny_model("llama")).prefill_len == tiny_model("llama").config.max_position_embeddings
    assert plan.settings()["batches"] == [2, 1] and plan.settings()["compile_batches"] == [1]
    with pytest.raises(ValueError, match="must be among the batch sizes"):
        BenchPlan(("cats",), (0.5,), (1,), compile_batches=(4,))
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        BenchPlan(("cats",), (0.5,), (1,), new_tokens=1)
