"""countdown.ppl_sparsity: the bisection brackets the true crossing of a known curve, shares probes
between increases, reports open brackets; on a tiny model every probe is a real sparsify + perplexity."""

from __future__ import annotations

import math

import pytest

import countdown
from countdown.ppl_sparsity import Bracket, Probe, ppl_p_sparsity, sparsity_at_increase
from tiny_models import tiny_model, tokens


def test_bisection_brackets_the_crossing_of_a_known_curve_and_shares_probes():
    calls = []

    def measure(s):  # ppl = 10 * (1 + 1.3 s^2): the p crossing is at sqrt(p / 1.3)
        calls.append(s)
        return s, 10.0 * (1 + 1.3 * s * s)

    brackets, probes = sparsity_at_increase(measure, 10.0, (0.01, 0.05), low=0.0, high=0.8, steps=4)
    for p, b in brackets.items():
        assert b.below.target <= math.sqrt(p / 1.3) < b.above.target
        assert b.above.target - b.below.target <= 0.8 / 2 ** 4 + 1e-12
        assert b.below.increase <= p < b.above.increase
        assert b.below.target <= b.estimate <= b.above.target
        assert abs(b.estimate - math.sqrt(p / 1.3)) < 0.02
    assert len(calls) == len(set(calls)) == len(probes)  # no target measured twice
    assert calls[0] == 0.8 and len(calls) < 1 + 2 * 4  # the 5% search reused the 1% search's probes
    assert [q.target for q in probes] == calls


def test_open_brackets_and_bad_arguments():
    flat, _ = sparsity_at_increase(lambda s: (s, 5.0), 5.0, (0.01,), high=0.5, steps=3)
    assert flat[0.01].above is None and flat[0.01].below.target == 0.5 and math.isnan(flat[0.01].estimate)
    steep, probes = sparsity_at_increase(lambda s: (s, 50.0), 5.0, (0.01,), low=0.2, high=0.5, steps=3)
    assert steep[0.01].below is None and len(probes) == 2  # low > 0 is probed, not assumed dense
    assert Bracket(0.05, Probe(0.1, 0.1, 1.0, 0.05), Probe(0.2, 0.2, 1.0, 0.05)).estimate == 0.1
    with pytest.raises(ValueError, match="dense_ppl must be"):
        sparsity_at_increase(lambda s: (s, 1.0), float("nan"))
    with pytest.raises(ValueError, match="0 <= low < high < 1"):
        sparsity_at_increase(lambda s: (s, 1.0), 1.0, low=0.5, high=0.5)
    with pytest.raises(ValueError, match="steps must be an int"):
        sparsity_at_increase(lambda s: (s, 1.0), 1.0, steps=-1)
    with pytest.raises(ValueError, match="increases are fractions"):
        sparsity_at_increase(lambda s: (s, 1.0), 1.0, (0.0,))


@pytest.mark.parametrize("model_wide", [False, True])
def test_probes_on_a_tiny_model_are_real_sparse_perplexities(model_wide):
    model = tiny_model("llama")
    calib, eval_ids = tokens(4, 32, seed=2), tokens(1, 160, seed=7)[0]
    brackets, probes, dense_ppl = ppl_p_sparsity(model, "teal", calib, eval_ids, increases=(1e-4,),
                                                 model_wide=model_wide, steps=1, context=32)
    assert not countdown.api.is_sparsified(model)
    want_dense = countdown.perplexity(model, eval_ids, context=32, positions="decode", progress=False).ppl
    assert dense_ppl == pytest.approx(want_dense)
    assert probes[0].target == 0.8 and len(probes) <= 2
    again = probes[-1]
    countdown.sparsify(model, "teal", again.target, calibration=calib, mode="threshold", positions="decode",
                       attention=again.target if model_wide else None, max_windows=None, progress=False)
    r = countdown.perplexity(model, eval_ids, context=32, progress=False)
    countdown.unsparsify(model)
    assert r.ppl == pytest.approx(again.ppl, rel=1e-6) and r.sparsity == pytest.approx(again.measured)
    for p, b in brackets.items():  # a random model's perplexity barely moves: the bracket may stay open
        assert b.above is None or b.above.increase > p
        assert b.below is None or b.below.increase <= p
        assert b.below is not None or b.above is not None


def test_predictor_methods_are_refused():
    with pytest.raises(ValueError, match="predictor-free"):
        ppl_p_sparsity(tiny_model("llama"), "d-countdown", tokens(2, 16), tokens(1, 64)[0])
