"""Input-sparse GEMV: a linear layer that reads only the weight rows of the input channels it keeps.

    input_sparse_linear(x, w_t, thr, channel_scale=None)
        y[b, :] = sum over channels j with score[b, j] > thr of x[b, j] * w_t[j, :]
        score = |x|                      (TEAL)
        score = |x| * channel_scale      (WINA; channel_scale[j] = a norm of weight column j, fp32)

This is the op behind sparsity on the *input* of a linear layer (TEAL, WINA, R-Sparse's sparse part):
the mask is on the channels of x, so what is skipped is one row of W^T per dropped channel.

Shapes and layout (B tokens, K input channels, N output channels):
    x              [B, K], [B, 1, K] or [K]; B in 1..16; bf16, fp16 or fp32
    w_t            [K, N] contiguous, x's dtype: W^T, so input channel j's weights are one contiguous
                   row (8 KB at N=4096, bf16). Keep this as the one copy of the weight: the model's
                   nn.Linear weight can be the view ``w_t.t()`` ([N, K], column-major), which
                   F.linear / cuBLAS take as it is for prefill and for the fallback.
    channel_scale  [K] fp32 (WINA) or None (TEAL)
    threshold      Python float, or a 1-element float tensor on the device (read by the kernel, so one
                   CUDA graph serves every threshold)
    y              [B, N] (x's leading shape + [N]) in x's dtype; accumulation is fp32.
For B > 1 each token keeps its own channels; a row of w_t is read once for the whole batch when any
token keeps its channel (the union), and multiplied by zero for the tokens that do not.

Kernel (``_input_sparse_kernel``): a grid of (N tiles of BLOCK_N columns) x (SPLIT contiguous ranges
of input channels), about ``programs_per_sm`` programs per SM. A program walks its channel range
BLOCK_K channels a step: it loads x for those channels and all tokens (L2-resident), tests the scores
against the threshold, and loads the [BLOCK_K, BLOCK_N] weight tile with the rows no token keeps
masked off (masked rows are never fetched). Tokens are accumulated with one ``tl.dot`` ([16, BLOCK_K]
x [BLOCK_K, BLOCK_N], tokens padded to 16 rows, masked x values zero). With SPLIT > 1 the programs of
one N tile add their fp32 partials into a persistent workspace (``_runtime.split_k_epilogue``): the last
one to take the tile's ticket casts the tile into y and zeroes the workspace and ticket again, so one
launch gives the result and leaves the workspace ready for the next call. Under
``torch.use_deterministic_algorithms`` (``_runtime.deterministic()``) each split stores its partials in a
slice of its own and the launcher sums the slices in order: bitwise-repeatable results.

Which kernel serves a call is `countdown.KernelPolicy.input_sparse`: "walk" (this one), "prefetch"
(``input_sparse_prefetch``) or "auto" (prefetch for one token, walk for 2-16; H100, docs/BENCHMARKS.md
2026-11-23: prefetch 1-14% faster at batch 1 on every Llama-3-8B shape, 6-15% slower at batch 2-16).

``input_sparse_unavailable_reason(x, w_t, channel_scale)`` says why the kernel cannot serve a call
(None when it can); the caller then uses ``countdown.kernels.reference.input_sparse_linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime, input_sparse_prefetch
from ..options import KernelPolicy
from .input_sparse_checks import MAX_BATCH, problem as _problem
from .pack import check_threshold

__all__ = ["InputSparseConfig", "input_sparse_linear", "input_sparse_linears", "input_sparse_unavailable_reason",
           "MAX_BATCH"]


@triton.jit
def _step(acc, rows, rm, x_ptr, w_ptr, scale_ptr, thr, offs_b, bm, offs_n, nm, K, N,
          WINA: tl.constexpr, F32: tl.constexpr):
    """acc [B_PAD, BLOCK_N] += the contribution of input channels ``rows`` [BLOCK_K] (valid where ``rm``).
    Rows that no token keeps are not fetched."""
    xm2 = bm[:, None] & rm[None, :]
    xv = tl.load(x_ptr + offs_b[:, None] * K + rows[None, :], mask=xm2, other=0.0,
                 eviction_policy="evict_last")  # [B_PAD, BLOCK_K]
    s = tl.abs(xv.to(tl.float32))
    if WINA:
        sc = tl.load(scale_ptr + rows, mask=rm, other=0.0, eviction_policy="evict_last")
        s = s * sc[None, :]
    keep = (s > thr) & xm2  # padding must never count as kept, even for a negative threshold
    xk = tl.where(keep, xv, tl.zeros_like(xv))
    any_keep = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]: the union over tokens
    w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], mask=any_keep[:, None] & nm[None, :],
                other=0.0, eviction_policy="evict_first")
    if F32:  # fp32 inputs, or any input in the interpreter (whose bf16 dot is wrong in triton 3.9)
        acc = tl.dot(xk.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(xk, w, acc)
    return acc


@triton.jit
def _input_sparse_kernel(
    x_ptr,      # [B, K] tokens, contiguous
    w_ptr,      # [K, N] W^T, contiguous
    scale_ptr,  # [K] fp32 channel scale (read when WINA)
    thr_ptr,    # [1] threshold tensor (read when THR_PTR)
    ws_ptr,     # [16, N] fp32 workspace, zero on entry and on exit (SPLIT); ORDERED: [SPLIT, B, N] slices
    cnt_ptr,    # [>= N tiles] int32 tickets, zero on entry and on exit (used when SPLIT)
    out_ptr,    # [B, N] output, x's dtype
    thr_value,  # float threshold (when not THR_PTR)
    B, K, N, KPP,  # tokens, input channels, output channels, input channels per program
    WINA: tl.constexpr, THR_PTR: tl.constexpr, B_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, F32: tl.constexpr,
    ORDERED: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if THR_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    offs_b = tl.arange(0, B_PAD)
    bm = offs_b < B
    lo = pid_k * KPP
    hi = tl.minimum(lo + KPP, K)
    kr = tl.arange(0, BLOCK_K)
    acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
    for k in tl.range(lo, hi, BLOCK_K, num_stages=NUM_STAGES):
        rows = k + kr
        acc = _step(acc, rows, rows < hi, x_ptr, w_ptr, scale_ptr, thr, offs_b, bm, offs_n, nm, K, N, WINA, F32)

    om = bm[:, None] & nm[None, :]
    off = offs_b[:, None] * N + offs_n[None, :]
    if SPLIT and ORDERED:  # deterministic: this split's own [B, N] slice of ws, summed in order by the caller
        tl.store(ws_ptr + pid_k * B * N + off, acc, mask=om)
    elif SPLIT:
        _runtime.split_k_epilogue(acc, ws_ptr + off, out_ptr + off, om, cnt_ptr + pid_n, tl.num_programs(1))
    else:
        tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=om)


# --------------------------------------------------------------------------------------------
# launch configuration


@dataclasses.dataclass(frozen=True)
class InputSparseConfig:
    """Launch parameters of ``_input_sparse_kernel``.

    block_n: output columns per program.  block_k: input channels (rows of w_t) per step.
    programs_per_sm: the channel split is chosen so that the grid is about this many programs per SM.
    num_stages: software-pipeline depth of the masked walk (loads of later steps in flight).
    """

    block_n: int = 256
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2


# The sweep of bench/input_sparse.py on an H100 (docs/KERNELS.md, "Input-sparse GEMV") picked this one
# at every Llama-3-8B shape, for batch 1 and batch 8, at sparsity 0 and 0.5.
_GPU_CONFIG = InputSparseConfig(block_n=256, block_k=32, num_warps=4, num_stages=4, programs_per_sm=2)
_INTERPRET_CONFIG = InputSparseConfig(block_n=16, block_k=16, num_warps=4, num_stages=1, programs_per_sm=8)


def pick_config(batch: int, k: int, n: int, device: torch.device) -> InputSparseConfig:
    """The launch configuration the public op uses (one per shape, whatever the sparsity)."""
    return _INTERPRET_CONFIG if device.type != "cuda" else _GPU_CONFIG


def _grid(cfg: InputSparseConfig, k: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(N tiles, channel split, channels per program)."""
    n_tiles = triton.cdiv(n, cfg.block_n)
    step = cfg.block_k
    target = cfg.programs_per_sm * _runtime.num_sms(device)
    split = max(1, min(target // n_tiles, triton.cdiv(k, step)))
    kpp = triton.cdiv(triton.cdiv(k, split), step) * step
    return n_tiles, triton.cdiv(k, kpp), kpp


def _launch(x: torch.Tensor, w_t: torch.Tensor, channel_scale: Optional[torch.Tensor],
            threshold: Optional[torch.Tensor], threshold_value: float, out: torch.Tensor,
            config: Optional[InputSparseConfig] = None) -> torch.Tensor:
    """Run the walk kernel on validated arguments: x [B, K] contiguous, out [B, N]. Returns out."""
    batch, k = x.shape
    n = w_t.shape[1]
    device = w_t.device
    cfg = config or pick_config(batch, k, n, device)
    n_tiles, split, kpp = _grid(cfg, k, n, device)
    block_k = max(cfg.block_k, 16)  # tl.dot needs K >= 16
    # one zero-on-exit workspace per (device, N): 16 fp32 rows, then one ticket per tile of >= 16 columns
    ws = _runtime.persistent_workspace(device, MAX_BATCH * n + triton.cdiv(n, 16))
    acc_ws = ws[: MAX_BATCH * n].view(torch.float32)
    tickets = ws[MAX_BATCH * n:]
    parts = _runtime.ordered_workspace(split, batch * n, device)
    if parts is not None:
        acc_ws = parts
    _input_sparse_kernel[(n_tiles, split)](
        x, w_t, w_t if channel_scale is None else channel_scale, tickets if threshold is None else threshold,
        acc_ws, tickets, out, float(threshold_value), batch, k, n, kpp,
        WINA=channel_scale is not None, THR_PTR=threshold is not None, B_PAD=MAX_BATCH,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, SPLIT=split > 1, NUM_STAGES=cfg.num_stages,
        F32=x.dtype == torch.float32 or device.type != "cuda", ORDERED=parts is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if parts is not None:
        out.copy_(parts.view(split, batch, n).sum(0))
    return out


def _impl(x: torch.Tensor, w_t: torch.Tensor, channel_scale: Optional[torch.Tensor],
          threshold: Optional[torch.Tensor], threshold_value: float) -> torch.Tensor:
    out = torch.empty(x.shape[0], w_t.shape[1], dtype=x.dtype, device=x.device)
    return _launch(x, w_t, channel_scale, threshold, threshold_value, out)


_op = torch.library.custom_op("countdown::input_sparse_linear", _impl, mutates_args=())


@_op.register_fake
def _(x, w_t, channel_scale, threshold, threshold_value):
    return x.new_empty(x.shape[0], w_t.shape[1])


# --------------------------------------------------------------------------------------------
# entry point


def input_sparse_unavailable_reason(x: torch.Tensor, w_t: torch.Tensor,
                                    channel_scale: Optional[torch.Tensor] = None) -> str | None:
    """None when ``input_sparse_linear`` can run on these arguments, else why not (then use
    ``reference.input_sparse_linear``, or F.linear(x_masked, w_t.t()), with the same arguments)."""
    p = _problem(x, w_t, channel_scale)
    return None if p is None else p[1]


def _prefetch(policy: KernelPolicy, tokens: int) -> bool:
    """Whether ``policy.input_sparse`` sends a call of ``tokens`` tokens to the prefetch kernel."""
    return policy.input_sparse == "prefetch" or (policy.input_sparse == "auto" and tokens == 1)


def input_sparse_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: float | torch.Tensor, *,
                        channel_scale: Optional[torch.Tensor] = None,
                        policy: KernelPolicy | str | None = None) -> torch.Tensor:
    """y = sum over input channels j with score_j > threshold of x_j * w_t[j, :]; see the module docstring.

    x [B, K] / [B, 1, K] / [K] (B <= 16), w_t [K, N] contiguous in x's dtype, channel_scale [K] fp32
    (score |x| * channel_scale) or None (score |x|). ``policy`` (`countdown.KernelPolicy`, default
    KernelPolicy()): its ``input_sparse`` picks the walk or the prefetch kernel (the registered ops
    ``countdown::input_sparse_linear`` and ``countdown::input_sparse_multi``), its ``pdl`` the launch.
    Returns y with x's leading shape + [N], in x's dtype. Raises ValueError / TypeError naming the
    problem when the kernel cannot serve the call (``input_sparse_unavailable_reason``)."""
    policy = KernelPolicy.of(policy)
    p = _problem(x, w_t, channel_scale)
    if p is not None:
        raise p[0](f"input_sparse_linear: {p[1]}")
    k, n = w_t.shape
    if _prefetch(policy, x.numel() // k):
        return input_sparse_prefetch.input_sparse_multi(x, [w_t], [threshold], channel_scales=[channel_scale],
                                                        policy=policy)[0]
    x2 = x.reshape(-1, k).contiguous()
    thr_t, thr_v = check_threshold(threshold, x.device)
    y = _runtime.op_or_impl(_op, _impl)(x2, w_t, channel_scale, thr_t, thr_v)
    return y.reshape(*x.shape[:-1], n)


def input_sparse_linears(x: torch.Tensor, w_ts: list[torch.Tensor], threshold: float | torch.Tensor, *,
                         channel_scale: Optional[torch.Tensor] = None,
                         policy: KernelPolicy | str | None = None) -> list[torch.Tensor]:
    """[input_sparse_linear(x, w_t, threshold, channel_scale=channel_scale, policy=policy) for w_t in w_ts]:
    weights that share x, its mask and its threshold (an FFN's gate and up). One token with
    ``policy.fuse_gate_up`` and the prefetch kernel: one launch for all of them (at most
    ``input_sparse_prefetch.MAX_WEIGHTS``; at 2-16 tokens the walk kernel's one launch per weight is
    measured faster on these wide weights); otherwise one launch each. Same shapes and errors as
    ``input_sparse_linear``; returns one output per weight."""
    policy = KernelPolicy.of(policy)
    w_ts = list(w_ts)
    single = x.dim() == 1 or x.numel() == x.shape[-1]
    if policy.fuse_gate_up and _prefetch(policy, 1) and single and 1 < len(w_ts) <= input_sparse_prefetch.MAX_WEIGHTS:
        return input_sparse_prefetch.input_sparse_multi(x, w_ts, [threshold] * len(w_ts),
                                                        channel_scales=[channel_scale] * len(w_ts), policy=policy)
    return [input_sparse_linear(x, w_t, threshold, channel_scale=channel_scale, policy=policy) for w_t in w_ts]
