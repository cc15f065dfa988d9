"""countdown.natural_sparsity: per-layer fractions checked against the coefficients computed from each
FFN's input by `FFNSite.coefficient` (another path than the hook); exact zeros of a ReLU model equal its
non-positive pre-activations; clear refusals."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import countdown
from countdown.models import ffn_sites
from countdown.natural_sparsity import natural_sparsity
from tiny_models import tiny_model, tokens


def _ffn_inputs(model, windows):
    """Each layer's FFN inputs [N, H], captured at the FFN module itself."""
    sites = ffn_sites(model)
    seen = [[] for _ in sites]
    hooks = [s.input_module.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, s in enumerate(sites)]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w.view(1, -1))
    for h in hooks:
        h.remove()
    return sites, [torch.cat(x) for x in seen]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fractions_match_the_coefficients_of_each_layer(arch):
    model = tiny_model(arch)
    windows = tokens(3, 17, seed=5)
    r = natural_sparsity(model, windows, epsilons=(0.1, 0.5), mass_shares=(0.9, 1.0))
    sites, inputs = _ffn_inputs(model, windows)
    assert r.n_tokens == 3 * 17 and r.layers == len(sites) and r.intermediate_size == sites[0].intermediate_size
    for layer, (site, x) in enumerate(zip(sites, inputs)):
        with torch.no_grad():
            a = site.coefficient(x).abs()
        mean = a.mean(dim=1, keepdim=True)
        assert r.below[0.1][layer] == pytest.approx(int((a <= 0.1 * mean).sum()) / a.numel(), abs=1e-9)
        assert r.below[0.5][layer] == pytest.approx(int((a <= 0.5 * mean).sum()) / a.numel(), abs=1e-9)
        # mass: per token, the most smallest coefficients whose sum stays within 10% of the total
        droppable = 0
        for row in a:
            ordered, total = row.sort().values, float(row.sum())
            droppable += int((ordered.cumsum(0) <= 0.1 * total).sum())
        assert r.mass[0.9][layer] == pytest.approx(droppable / a.numel(), abs=1e-9)
        assert r.zeros[layer] == 0.0 and r.mass[1.0][layer] == 0.0  # SiLU/GELU: nothing exactly zero
    assert 0 < r.below[0.1][0] < r.below[0.5][0] < 1
    mean, lo, hi = r.summary()["below_0.5"]
    assert lo <= mean <= hi and set(r.summary()) == {"zeros", "below_0.1", "below_0.5", "mass_0.9", "mass_1"}


def test_exact_zeros_of_a_relu_model_are_its_non_positive_pre_activations():
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=97, n_embd=32, n_inner=72, n_layer=2, n_head=4, n_positions=64,
                           activation_function="relu")
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    windows = tokens(2, 20, seed=3)
    r = natural_sparsity(model, windows)
    sites, inputs = _ffn_inputs(model, windows)
    for layer, (site, x) in enumerate(zip(sites, inputs)):
        with torch.no_grad():
            pre = site.modules["in_proj"](x)
        assert r.zeros[layer] == pytest.approx(int((pre <= 0).sum()) / pre.numel(), abs=1e-9)
        assert 0.3 < r.zeros[layer] < 0.7  # a random ReLU layer: about half
        assert r.below[0.01][layer] >= r.zeros[layer]


def test_refusals_are_clear():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\[n, T\] torch.long"):
        natural_sparsity(model, tokens(1, 8)[0])
    with pytest.raises(ValueError, match="epsilons must be >= 0"):
        natural_sparsity(model, tokens(1, 8), epsilons=(-0.1,))
    with pytest.raises(ValueError, match=r"mass_shares must be in \(0, 1\]"):
        natural_sparsity(model, tokens(1, 8), mass_shares=(0.0,))
    countdown.sparsify(model, "cats", 0.5, mode="topk", progress=False)
    with pytest.raises(ValueError, match="unsparsify"):
        natural_sparsity(model, tokens(1, 8))
