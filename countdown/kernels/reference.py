"""Pure-torch references of every op in ``countdown.kernels`` (same names, same signatures).

They run on any device and any batch shape, compute in fp32 and return the weights' dtype. The
Triton ops are tested against them, and they are the fallback path wherever the kernels do not
apply (CPU, prefill, batch > 1, unsupported shapes).

Shapes and layouts (H hidden size, I intermediate size, ``...`` any leading batch dimensions):

    x         [..., H]   token hidden states entering the FFN
    w_gate    [I, H]     nn.Linear weight of the gate projection (row i = neuron i)
    w_up      [I, H]     nn.Linear weight of the up projection
    w_down_t  [I, H]     W_down transposed (W_down is [H, I]); row i = neuron i's output column
    t, a, score  [..., I]   coefficient, dense projection output, predictor score
    threshold float, a 1-element tensor, or (the FFN ops) an [I] tensor of per-neuron thresholds shared
              by every token; a neuron is kept when its score is strictly above its threshold.

Outputs are [..., H].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pack import ACTIVATIONS


def activation(v: torch.Tensor, act: str) -> torch.Tensor:
    """act(v) for act in ``ACTIVATIONS`` (gelu_tanh is Gemma's tanh approximation)."""
    if act == "silu":
        return F.silu(v)
    if act == "gelu_tanh":
        return F.gelu(v, approximate="tanh")
    if act == "gelu":
        return F.gelu(v)
    if act == "relu":
        return F.relu(v)
    raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def midpoint_threshold(score: torch.Tensor, sparsity: float) -> float:
    """A threshold that drops a ``sparsity`` fraction of ``score``, midway between two sorted values,
    so that rounding differences between a kernel and this reference cannot flip a neuron (for tests
    and benchmarks; models use calibrated thresholds)."""
    s = score.float().flatten().sort().values
    k = int(round(sparsity * s.numel()))
    if k == 0:
        return float(s[0]) - 1.0
    if k >= s.numel():
        return float(s[-1]) + 1.0
    return float(0.5 * (s[k - 1] + s[k]))


def union_kept_fraction(keep: torch.Tensor) -> torch.Tensor:
    """Fraction of neurons kept by at least one token of a batch: keep [..., B, I] bool (token b keeps
    neuron i) gives [...] fp32. This is the share of rows a batched kernel reads (each union row
    once); for B independent masks of sparsity s it is about 1 - s**B."""
    if keep.dim() < 2:
        raise ValueError(f"keep must be [..., B, I], got shape {tuple(keep.shape)}")
    return keep.bool().any(dim=-2).float().mean(dim=-1)


def _thr(threshold: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
    """The threshold as a float, a 0-d fp32 tensor, or an fp32 vector broadcast over the last dim."""
    if isinstance(threshold, torch.Tensor):
        t = threshold.to(device=like.device, dtype=torch.float32)
        if t.numel() == 1:
            return t.reshape(())
        if t.dim() != 1 or t.numel() != like.shape[-1]:
            raise ValueError(f"threshold must hold one value or one per entry of the last dimension "
                             f"({like.shape[-1]}), got shape {tuple(threshold.shape)}")
        return t
    return float(threshold)


def _down(t: torch.Tensor, keep: torch.Tensor, w_down_t: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, t, torch.zeros_like(t)) @ w_down_t.float()


def _proj(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


def dense_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
              *, act: str = "silu") -> torch.Tensor:
    """y = sum_i act(g_i) u_i w_down_t[i] over all neurons (the FFN with nothing skipped)."""
    t = activation(_proj(x, w_gate), act) * _proj(x, w_up)
    return (t @ w_down_t.float()).to(w_down_t.dtype)


def sparse_down(t: torch.Tensor, w_down_t: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """y = sum over i with |t_i| > threshold of t_i * w_down_t[i, :]  (D-COUNTDOWN, ideal)."""
    t32 = t.float()
    return _down(t32, t32.abs() > _thr(threshold, t), w_down_t).to(w_down_t.dtype)


def coefficient_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                    threshold: float | torch.Tensor, *, act: str = "silu") -> torch.Tensor:
    """D-COUNTDOWN ideal end to end: t = act(W_gate x) * (W_up x) densely, then ``sparse_down``."""
    t = activation(_proj(x, w_gate), act) * _proj(x, w_up)
    return _down(t, t.abs() > _thr(threshold, t), w_down_t).to(w_down_t.dtype)


def _gather_score(a32: torch.Tensor, dense: str, score_act: bool | None, act: str, signed: bool) -> torch.Tensor:
    if score_act is None:
        score_act = dense == "gate"
    if score_act and dense != "gate":
        raise ValueError("score_act=True needs dense='gate' (the activation applies to the gate)")
    s = activation(a32, act) if score_act else a32
    return s if signed else s.abs()


def gather_ffn(x: torch.Tensor, a: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
               threshold: float | torch.Tensor, *, act: str = "silu", dense: str = "gate",
               score_act: bool | None = None, signed: bool = False) -> torch.Tensor:
    """CATS / M-COUNTDOWN / DejaVu / CHESS given the dense projection ``a``.

    dense="gate": a = W_gate x (pre-activation), w_sparse = W_up,  t_i = act(a_i) * (W_up[i] . x)
    dense="up":   a = W_up x,                    w_sparse = W_gate, t_i = act(W_gate[i] . x) * a_i
    Neuron i is kept when score_i > threshold_i, score = |act(a)| if score_act else |a|
    (default: |act(a)| for dense="gate", i.e. CATS; |a| for dense="up", i.e. M-COUNTDOWN), without
    the absolute value when ``signed`` (DejaVu: a_i > threshold). threshold_i: one value, or one per
    neuron (CHESS: τ / E|u_i|).
    """
    if dense not in ("gate", "up"):
        raise ValueError(f"dense must be 'gate' or 'up', got {dense!r}")
    a32 = a.float()
    keep = _gather_score(a32, dense, score_act, act, signed) > _thr(threshold, a)
    b = _proj(x, w_sparse)
    t = activation(a32, act) * b if dense == "gate" else activation(b, act) * a32
    return _down(t, keep, w_down_t).to(w_down_t.dtype)


def fused_gather_ffn(x: torch.Tensor, w_dense: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
                     threshold: float | torch.Tensor, *, act: str = "silu", dense: str = "gate",
                     score_act: bool | None = None, signed: bool = False) -> torch.Tensor:
    """``gather_ffn`` with the dense projection a = w_dense x computed too (w_dense = W_gate or W_up)."""
    return gather_ffn(x, _proj(x, w_dense), w_sparse, w_down_t, threshold, act=act, dense=dense,
                      score_act=score_act, signed=signed)


def predicted_sparse_ffn(x: torch.Tensor, score: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: float | torch.Tensor, *,
                         act: str = "silu") -> torch.Tensor:
    """D-COUNTDOWN practical: neurons with score_i > threshold (signed; a bool mask: True) get
    t_i = act(W_gate[i] . x) * (W_up[i] . x); y = sum of t_i * w_down_t[i] over them."""
    if score.dtype == torch.bool:
        keep = score
    else:
        keep = score.float() > _thr(threshold, score)
    t = activation(_proj(x, w_gate), act) * _proj(x, w_up)
    return _down(t, keep, w_down_t).to(w_down_t.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v per key/value head, in fp32: q [B, H, G, D] (a head's G query rows),
    k, v [B, H, L, D], mask [B or 1, 1, 1, L] bool (True: attend) or float (added), or None.
    Returns [B, H, G, D] in q's dtype (the kernel ``decode_attention``'s reference)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q.float() @ k.float().transpose(-1, -2) * scale  # [B, H, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def input_sparse_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: float | torch.Tensor, *,
                        channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = sum over input channels j with score_j > threshold of x_j * w_t[j, :]  (TEAL / WINA).

    x [..., K]; w_t [K, N] = W^T (W the nn.Linear weight [N, K]); score = |x| (TEAL) or
    |x| * channel_scale (WINA, channel_scale [K]); each token has its own mask. Returns [..., N] in
    x's dtype."""
    x32 = x.float()
    score = x32.abs() if channel_scale is None else x32.abs() * channel_scale.float()
    xk = torch.where(score > _thr(threshold, x), x32, torch.zeros_like(x32))
    return (xk @ w_t.float()).to(x.dtype)
