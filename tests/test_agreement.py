"""countdown.agreement: greedy agreement with the dense model and drift perplexity, checked against a
separate dense copy of the model; the dense switch; the CLI command on SmolLM2; clear errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import countdown
from countdown.agreement import dense, generation_agreement
from countdown.cli import app
from tiny_models import tiny_model, tokens


def _pair(arch="llama", method="teal", sparsity=0.7):
    base = tiny_model(arch)
    sparse = copy.deepcopy(base)
    countdown.sparsify(sparse, method, sparsity, mode="topk", progress=False)
    return base, sparse


def test_dense_switch_gives_the_dense_models_logits_and_tokens():
    base, sparse = _pair()
    ids = tokens(1, 12, seed=4)
    prompt = ids[:, :6]
    want = base.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert not torch.equal(countdown.generate(sparse, prompt, max_new_tokens=20, eos_token_id=[]), want)
    with torch.no_grad(), dense(sparse):
        assert torch.equal(countdown.generate(sparse, prompt, max_new_tokens=20, eos_token_id=[]), want)
        assert torch.allclose(sparse(ids).logits, base(ids).logits, atol=1e-6)
    assert not torch.equal(countdown.generate(sparse, prompt, max_new_tokens=20, eos_token_id=[]), want)


def test_agreement_and_drift_match_a_separate_dense_model():
    base, sparse = _pair("qwen3")
    prompts = tokens(3, 7, seed=9)
    n = 24
    r = generation_agreement(sparse, prompts, max_new_tokens=n)
    for i, prompt in enumerate(prompts):
        ref = base.generate(prompt.view(1, -1), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert torch.equal(r.dense_tokens[i], ref[0, 7:])
        mine = countdown.generate(sparse, prompt.view(1, -1), max_new_tokens=n, eos_token_id=[])[0, 7:]
        assert torch.equal(r.tokens[i], mine)
        differ = (mine != ref[0, 7:]).nonzero()
        assert r.first_divergence[i] == (int(differ[0]) if len(differ) else n)
        assert r.fraction_equal[i] == pytest.approx((mine == ref[0, 7:]).float().mean().item())
    assert r.mean_first_divergence < n  # this sparse model does drift
    nll = 0.0
    with torch.no_grad():
        for prompt, cont in zip(prompts, r.tokens):
            logits = base(torch.cat([prompt, cont]).view(1, -1)).logits[0, 6:-1]
            nll += float(F.cross_entropy(logits, cont, reduction="sum"))
    assert r.drift_ppl == pytest.approx(math.exp(nll / r.tokens.numel()), rel=1e-5)
    assert r.drift_ppl > r.dense_ppl  # the dense model finds its own greedy text likelier
    assert math.isnan(r.tokens_per_dense_forward)


def test_strict_correction_restores_full_agreement_and_reports_its_rounds():
    _, sparse = _pair("qwen3")
    prompts = tokens(2, 7, seed=9)
    plain = generation_agreement(sparse, prompts, max_new_tokens=20)
    fixed = generation_agreement(sparse, prompts, max_new_tokens=20, correct_every=4, dense_tokens=plain.dense_tokens)
    assert plain.mean_fraction_equal < 1.0
    assert fixed.first_divergence == [20, 20] and fixed.mean_fraction_equal == 1.0
    assert fixed.drift_ppl == pytest.approx(fixed.dense_ppl)
    assert fixed.drafted == 4 * fixed.dense_forwards and 1 <= fixed.tokens_per_dense_forward <= 5


def test_agreement_refuses_bad_input_clearly():
    _, sparse = _pair()
    with pytest.raises(ValueError, match=r"\[n, P\] torch.long"):
        generation_agreement(sparse, tokens(1, 6)[0], max_new_tokens=4)
    with pytest.raises(ValueError, match="dense_tokens has shape"):
        generation_agreement(sparse, tokens(2, 6), max_new_tokens=4, dense_tokens=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        generation_agreement(sparse, tokens(2, 6), max_new_tokens=0)
    everywhere = tiny_model("llama")
    countdown.sparsify(everywhere, "teal", 0.5, mode="topk", positions="all", progress=False)
    with pytest.raises(ValueError, match="positions='all'"):
        generation_agreement(everywhere, tokens(1, 6), max_new_tokens=4)


def test_agreement_command_on_smollm2_writes_rows(smollm2, tmp_path):
    out = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(app, ["agreement", "--configs", "m-countdown:0.7", "--correct-every", "4",
                                      "--rules", "strict", "--prompts", "1", "--prompt-len", "32",
                                      "--new-tokens", "12", "--speed-repeats", "1", "--speed-tokens", "6",
                                      "--calib-windows", "2", "--context", "64", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correction"] for r in rows] == ["none", "strict k=4"]
    assert rows[1]["fraction_equal"] == 1.0 and rows[1]["mean_first_divergence"] == 12
    assert rows[0]["tokens_per_second"] > 0 and rows[0]["dense_tokens_per_second"] > 0
