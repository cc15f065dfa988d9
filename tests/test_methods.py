"""The comparison methods (DejaVu, S-COUNTDOWN, Dhar et al., CHESS, WINA, R-Sparse): each one's score is
the paper's (checked by hand on one layer's tensors), top-k keeps the exact count at every site,
calibrated thresholds reach the target at every site, sparsity 0 is the dense model, plain FFNs get
the documented behaviour, CHESS's per-neuron statistic survives save/load, and the kernel path of
DejaVu, S-COUNTDOWN, CHESS and WINA gives what their reference forward gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import countdown
from countdown.ffn import sparse_modules
from countdown.methods import METHODS, RSparse, keep_count
from tiny_models import tiny_model, tokens

NEW = ("dejavu", "s-countdown", "dhar", "chess", "wina", "r-sparse")
GATED_ONLY = tuple(m for m in NEW if METHODS[m].gated_only)


def _sparsify(model, method, sparsity, mode="topk", ids=None):
    ids = tokens(4, 32) if ids is None else ids
    needs_text = mode == "threshold" or METHODS[method].stats
    return countdown.sparsify(model, method, sparsity, mode=mode, calibration=ids if needs_text else None,
                              positions="all", progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class _Spy(torch.nn.Module):
    """A mask rule that delegates to the module's own and keeps every (site, mask) it returned."""

    def __init__(self, rule):
        super().__init__()
        self.rule, self.seen = rule, []

    def forward(self, site, score):
        mask = self.rule(site, score)
        self.seen.append((site, mask))
        return mask


def _layer0(method, sparsity=0.5, arch="llama"):
    """(module, x, weights) of layer 0 of a tiny model sparsified in top-k mode, and a random input."""
    model = _sparsify(tiny_model(arch), method, sparsity)
    module = sparse_modules(model)[0]
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    w = (module.gate_weight().detach(), module.up_weight().detach(), module.down_proj.weight.detach())
    return module, x, w


def _topk_mask(score, sparsity):
    idx = score.topk(keep_count(score.shape[-1], sparsity), dim=-1).indices
    return torch.zeros_like(score).scatter_(-1, idx, 1.0)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])  # separate, fused gate_up, gelu_tanh
@pytest.mark.parametrize("method", NEW)
def test_sparsity_zero_equals_dense(arch, method):
    model, ids = tiny_model(arch), tokens(2, 16)
    dense = _logits(model, ids)
    _sparsify(model, method, 0.0)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", NEW)
def test_topk_keeps_the_count_per_token_at_every_site(method):
    model = _sparsify(tiny_model("llama"), method, 0.6)
    spies = []
    for module in sparse_modules(model):
        module.masker = _Spy(module.masker)
        spies.append(module.masker)
    _logits(model, tokens(2, 10))
    for spy in spies:
        assert {site for site, _ in spy.seen} == set(METHODS[method].sites)
        for site, mask in spy.seen:
            kept = mask.sum(-1)
            assert (kept == keep_count(mask.shape[-1], 0.6)).all(), (site, kept)


@pytest.mark.parametrize("method", NEW)
def test_calibrated_thresholds_reach_target_at_every_site(method):
    model, ids = tiny_model("llama"), tokens(4, 32)
    cal = countdown.calibrate(model, method, ids, progress=False)
    for target in (0.5, 0.8):
        countdown.sparsify(model, method, target, calibration=cal, positions="all", progress=False)
        r = countdown.perplexity(model, ids.reshape(-1), context=32, progress=False)
        countdown.unsparsify(model)
        assert set(r.site_sparsity) == set(METHODS[method].sites)
        for site, measured in r.site_sparsity.items():
            assert abs(measured - target) < 0.05, (site, target, measured)
        assert abs(r.sparsity - target) < 0.05
        assert 0 < r.ffn_bytes_read < 1


# -- each score is the paper's, computed by hand from one layer's weights ---------------------------


def test_dejavu_keeps_the_largest_signed_gate_preactivations():
    module, x, (wg, wu, wd) = _layer0("dejavu")
    g = x @ wg.t()
    torch.testing.assert_close(module.method.scores(module, x)["coef"], g)
    mask = _topk_mask(g, 0.5)
    assert not torch.equal(mask, _topk_mask(g.abs(), 0.5))  # signed, not magnitude
    expected = (F.silu(g * mask) * (x @ wu.t())) @ wd.t()
    torch.testing.assert_close(module(x), expected)


def test_dejavu_on_a_plain_ffn_masks_the_signed_preactivation():
    model = _sparsify(tiny_model("gpt2"), "dejavu", 0.5)
    module = sparse_modules(model)[0]
    h = torch.randn(2, 7, 72, generator=torch.Generator().manual_seed(0))
    expected = module.act(h * _topk_mask(h, 0.5))
    torch.testing.assert_close(module(h), expected)


def test_s_countdown_saliency_is_half_t_squared_times_down_column_norm_squared():
    module, x, (wg, wu, wd) = _layer0("s-countdown")
    t = F.silu(x @ wg.t()) * (x @ wu.t())
    saliency = 0.5 * t**2 * (wd**2).sum(dim=0)
    torch.testing.assert_close(module.method.scores(module, x)["coef"], saliency)
    torch.testing.assert_close(module(x), (t * _topk_mask(saliency, 0.5)) @ wd.t())


def test_dhar_thresholds_gate_preactivation_up_output_and_ffn_output():
    module, x, (wg, wu, wd) = _layer0("dhar")
    g, u = x @ wg.t(), x @ wu.t()
    scores = module.method.scores(module, x)
    torch.testing.assert_close(scores["gate"], g.abs())  # the pre-activation, not act(g)
    torch.testing.assert_close(scores["up"], u.abs())
    torch.testing.assert_close(scores["output"], ((F.silu(g) * u) @ wd.t()).abs())
    gm, um = g * _topk_mask(g.abs(), 0.5), u * _topk_mask(u.abs(), 0.5)
    y = (F.silu(gm) * um) @ wd.t()
    torch.testing.assert_close(module(x), y * _topk_mask(y.abs(), 0.5))


def test_chess_importance_uses_the_mean_up_magnitude_of_calibration_text():
    model, ids = tiny_model("llama"), tokens(4, 32)
    inputs = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
    _logits(model, ids)  # the dense model: the FFN inputs that calibration sees
    hook.remove()
    wg, wu, wd = (p.detach().clone() for p in (model.model.layers[0].mlp.gate_proj.weight,
                                              model.model.layers[0].mlp.up_proj.weight,
                                              model.model.layers[0].mlp.down_proj.weight))
    mean_up = (torch.cat(inputs).reshape(-1, 32) @ wu.t()).abs().mean(dim=0)
    _sparsify(model, "chess", 0.5, ids=ids)
    module = sparse_modules(model)[0]
    torch.testing.assert_close(module.stat("up_abs_mean"), mean_up)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(3))
    a = F.silu(x @ wg.t())
    importance = a.abs() * mean_up
    torch.testing.assert_close(module.method.scores(module, x)["coef"], importance)
    torch.testing.assert_close(module(x), (a * _topk_mask(importance, 0.5) * (x @ wu.t())) @ wd.t())


def test_wina_scores_inputs_by_the_column_norms_of_the_consuming_matrix():
    module, x, (wg, wu, wd) = _layer0("wina")
    t = F.silu(x @ wg.t()) * (x @ wu.t())
    scores = module.method.scores(module, x)
    torch.testing.assert_close(scores["input"], x.abs() * wg.norm(dim=0))  # W_gate's norms (see Wina)
    torch.testing.assert_close(scores["coef"], t.abs() * wd.norm(dim=0))
    xm = x * _topk_mask(x.abs() * wg.norm(dim=0), 0.5)
    tm = F.silu(xm @ wg.t()) * (xm @ wu.t())
    torch.testing.assert_close(module(x), (tm * _topk_mask(tm.abs() * wd.norm(dim=0), 0.5)) @ wd.t())


def _rank_r(w, r):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_r_sparse_is_sparse_columns_plus_a_low_rank_remainder():
    module, x, (wg, wu, wd) = _layer0("r-sparse")
    method = module.method

    def linear(w, v):
        m = _topk_mask(v.abs() * w.norm(dim=0), 0.5)
        return (v * m) @ w.t() + (v * (1 - m)) @ _rank_r(w, method.rank(w.shape[1], w.shape[0])).t()

    assert method.rank(32, 72) == 1  # ⌊0.05·32·72/104⌋
    t = F.silu(linear(wg, x)) * linear(wu, x)
    torch.testing.assert_close(module(x), linear(wd, t), rtol=1e-4, atol=1e-5)
    dense_t = F.silu(x @ wg.t()) * (x @ wu.t())
    scores = method.scores(module, x)
    torch.testing.assert_close(scores["gate_input"], x.abs() * wg.norm(dim=0))
    torch.testing.assert_close(scores["up_input"], x.abs() * wu.norm(dim=0))
    torch.testing.assert_close(scores["coef"], dense_t.abs() * wd.norm(dim=0))


def test_r_sparse_with_full_rank_reproduces_the_dense_ffn():
    module, x, (wg, wu, wd) = _layer0("r-sparse", sparsity=0.7)
    full = RSparse("r-sparse", "full rank", sites=METHODS["r-sparse"].sites, low_rank_budget=2.0)
    dense = (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
    torch.testing.assert_close(full.forward(module, x, module.keep), dense, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(module(x), dense, rtol=1e-4, atol=1e-5)  # the default rank is not exact


def test_weight_derived_constants_follow_the_weights():
    module, x, _ = _layer0("s-countdown")
    before = module.column_norms("down").clone()
    a, _ = module.low_rank("down", 2)
    with torch.no_grad():
        module.down_proj.weight.mul_(2)
    torch.testing.assert_close(module.column_norms("down"), 2 * before)
    assert module.low_rank("down", 2)[0] is not a
    countdown.set_kernels(module, "always")  # W_down laid out input-major for the kernel: same norms
    torch.testing.assert_close(module.column_norms("down"), 2 * before)


def test_bytes_read():
    b = {m: METHODS[m].ffn_bytes_read for m in NEW}
    for m in NEW:
        assert b[m]("gated", {site: 0.0 for site in METHODS[m].sites}) == pytest.approx(
            1.0 + (0.05 if m == "r-sparse" else 0.0))
    assert b["dejavu"]("gated", {"coef": 0.5}) == pytest.approx(2 / 3)  # gate dense, up+down half
    assert b["dejavu"]("plain", {"coef": 0.5}) == pytest.approx(3 / 4)  # W_in dense, W_out half
    assert b["chess"]("gated", {"coef": 0.5}) == pytest.approx(2 / 3)
    assert b["s-countdown"]("gated", {"coef": 0.5}) == pytest.approx(5 / 6)  # gate+up dense
    # down columns skipped where gate or up was zeroed: 1 - 0.5·0.5; the output mask saves nothing
    assert b["dhar"]("gated", {"gate": 0.5, "up": 0.5, "output": 0.9}) == pytest.approx((2 + 0.25) / 3)
    assert b["wina"]("gated", {"input": 0.5, "coef": 0.5}) == pytest.approx(0.5)
    assert b["r-sparse"]("gated", {"gate_input": 0.5, "up_input": 0.5, "coef": 0.5}) == pytest.approx(0.55)


# -- plain FFNs and per-neuron statistics ----------------------------------------------------------


@pytest.mark.parametrize("method", GATED_ONLY)
def test_gated_only_methods_refuse_a_plain_ffn_up_front(method):
    model = tiny_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: countdown.sparsify(model, method, 0.5, calibration=tokens()),
                 lambda: countdown.calibrate(model, method, tokens(), progress=False)):
        with pytest.raises(ValueError, match="needs a gated FFN"):
            call()
    assert not countdown.is_sparsified(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_chess_needs_calibration_text_in_topk_mode_too():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="per-neuron statistics"):
        countdown.sparsify(model, "chess", 0.5, mode="topk")
    assert not countdown.is_sparsified(model)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_chess_statistic_survives_save_and_load(tmp_path, mode):
    model, ids = tiny_model("llama"), tokens(3, 24)
    _sparsify(model, "chess", 0.6, mode=mode, ids=ids)
    expected = _logits(model, ids)
    path = countdown.save_sparsity(model, tmp_path / "chess.safetensors")
    fresh = countdown.load_sparsity(tiny_model("llama"), path)
    for saved, loaded in zip(sparse_modules(model), sparse_modules(fresh)):
        assert loaded.stat("up_abs_mean").shape == (72,)
        assert torch.equal(loaded.stat("up_abs_mean"), saved.stat("up_abs_mean"))
    torch.testing.assert_close(_logits(fresh, ids), expected)


def test_a_calibration_without_the_statistic_is_refused():
    model, ids = tiny_model("llama"), tokens(3, 24)
    cal = countdown.calibrate(model, "chess", ids, progress=False)
    assert len(cal.stats) == 2 and cal.stats[0]["up_abs_mean"].shape == (72,)
    cal.stats = []
    with pytest.raises(ValueError, match="lacks the per-neuron statistics"):
        countdown.sparsify(model, "chess", 0.5, calibration=cal, positions="all")
    assert not countdown.is_sparsified(model)


def test_chess_calibration_does_not_depend_on_the_methods_calibrated_beside_it():
    model, ids = tiny_model("llama"), tokens(3, 24)
    alone = countdown.calibrate_methods(model, ["chess"], ids, progress=False)["chess"]
    shared = countdown.calibrate_methods(model, ["cats", "chess", "r-sparse"], ids, progress=False)["chess"]
    assert torch.equal(alone.stats[1]["up_abs_mean"], shared.stats[1]["up_abs_mean"])
    assert torch.equal(alone.thresholds(0.6), shared.thresholds(0.6))


# -- kernel paths (Triton interpreter without a GPU) -------------------------------------------------

KERNELLED = ("dejavu", "s-countdown", "chess", "wina", "teal")
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ODD_H, ODD_I = 36, 75  # neither a power of two nor a multiple of 16


def _odd_model(method, sparsity=0.6):
    """A one-layer Llama of odd sizes, sparsified in threshold mode (the kernels' mode) on KERNEL_DEVICE."""
    import transformers as tf

    pytest.importorskip("triton")
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=97, hidden_size=ODD_H, intermediate_size=ODD_I, num_hidden_layers=1,
                            num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=64)
    model = tf.AutoModelForCausalLM.from_config(config).eval().to(KERNEL_DEVICE)
    countdown.sparsify(model, method, sparsity, calibration=tokens(4, 24), positions="all", progress=False)
    return sparse_modules(model)[0]


def _kernel_and_reference(module, batch, seed=0):
    x = torch.randn(batch, 1, ODD_H, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)
    module.kernels = "always"
    assert module.kernel_skip_reason(x) is None
    fast = module(x)
    module.kernels = "off"
    return x, fast, module(x)


@pytest.mark.parametrize("method", KERNELLED)
def test_kernel_forward_matches_the_reference_forward(method):
    module = _odd_model(method)
    for batch in (1, 3):  # the batch-1 kernel and the batched (union) kernels
        x, fast, ref = _kernel_and_reference(module, batch, seed=batch)
        assert fast.shape == ref.shape == x.shape and fast.dtype == ref.dtype
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
        dense = module._dense_forward(x)
        assert not torch.allclose(ref, dense, rtol=1e-3, atol=1e-4)  # neurons were skipped


@pytest.mark.parametrize("method", KERNELLED)
def test_kernels_stay_off_in_topk_mode(method):
    model = _sparsify(tiny_model("llama"), method, 0.5, mode="topk")
    module = sparse_modules(model)[0]
    module.kernels = "always"
    assert "thresholds only" in module.kernel_skip_reason(torch.randn(1, 1, 32))


def test_chess_kernel_thresholds_are_cached_and_follow_threshold_and_statistic():
    module = _odd_model("chess")
    _kernel_and_reference(module, 1)
    thr = module._kernel_thresholds["chess:coef"][2]
    torch.testing.assert_close(thr, module.threshold("coef") / module.stat("up_abs_mean"))
    _kernel_and_reference(module, 1)
    assert module._kernel_thresholds["chess:coef"][2] is thr  # computed once, not per call
    with torch.no_grad():
        module.masker.thresholds.mul_(1.5)  # in place: the version counter moves
    x, fast, ref = _kernel_and_reference(module, 2, seed=3)
    torch.testing.assert_close(module._kernel_thresholds["chess:coef"][2], 1.5 * thr)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # E|u_i| = 0: importance 0, never kept (τ >= 0)
        module.stat_up_abs_mean[::4] = 0
    for batch in (1, 3):
        torch.testing.assert_close(*_kernel_and_reference(module, batch, seed=batch)[1:], rtol=1e-4, atol=1e-5)
    assert torch.isinf(module._kernel_thresholds["chess:coef"][2][::4]).all()
    with torch.no_grad():  # τ < 0 keeps every neuron, those with E|u_i| = 0 too: the dense FFN
        module.masker.thresholds.fill_(-0.01)
    x, fast, ref = _kernel_and_reference(module, 1)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, module._dense_forward(x), rtol=1e-4, atol=1e-5)


def test_s_countdown_kernel_follows_the_down_weights_and_negative_thresholds():
    module = _odd_model("s-countdown")
    with torch.no_grad():  # zero down columns: saliency 0, never kept; the cached thresholds must follow
        module.down_proj.weight[:, ::5] = 0
    for batch in (1, 3):
        torch.testing.assert_close(*_kernel_and_reference(module, batch, seed=batch)[1:], rtol=1e-4, atol=1e-5)
    thr = module._kernel_thresholds["s-countdown:coef"][2]
    assert torch.isinf(thr[::5]).all() and torch.isfinite(thr[1::5]).all()
    norms = module.column_norms("down")
    torch.testing.assert_close(thr[1::5], (2 * module.threshold("coef")).sqrt() / norms[1::5])
    with torch.no_grad():
        module.masker.thresholds.fill_(-1.0)  # a saliency is never negative: every neuron kept
    x, fast, ref = _kernel_and_reference(module, 2)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, module._dense_forward(x), rtol=1e-4, atol=1e-5)
