"""TEAL's (and WINA's) whole gated FFN for one decode token in one launch: input-sparse gate and up, the
activation, and the input-sparse down projection.

    input_sparse_ffn(x, w_in_ts, w_down_t, thr_in, thr_coef, act="silu", channel_scales=None)
        x_kept = x where score_in > thr_in, else 0          score_in  = |x|   (TEAL) or |x| * s_in (WINA)
        t      = act(W_gate x_kept) * (W_up x_kept)
        y      = sum over neurons i with score_i > thr_coef   score_i = |t_i| (TEAL) or |t_i| * s_coef_i (WINA)
                 of t_i * w_down_t[i, :]

The same function as ``input_sparse_linears`` on [w_gate_t, w_up_t], the activation and
``input_sparse_linear`` on w_down_t (the three-launch path every batch size can take, and the one used
here for 2-16 tokens or with ``FUSE`` off), except that t stays fp32 inside the kernel instead of being
rounded to x's dtype before its threshold test.

Why one launch. On the Llama-3-8B shape TEAL's FFN at 50% reads 176 MB a layer (58.7 µs at 3.0 TB/s),
and its two input-sparse launches plus the activation kernel between them took ~78 µs on the H100
(docs/KERNELS.md): each launch pays its own start, pipeline fill and split-K reduction. Here program p
owns the neurons [p * NPP, (p + 1) * NPP) (NPP a multiple of 16: 32-byte aligned row fragments):
- phase 1 walks every input channel BLOCK_K a step; channels with |x| <= thr_in are masked off the
  [BLOCK_K, NPP] tiles of W_gate^T and W_up^T (never fetched), and the two tiles are reduced with
  ``tl.dot`` (x padded to a 16-row tile), so gate and up of the program's neurons are complete in fp32;
- t = act(gate) * up goes to an fp32 scratch vector, and phase 2 is the D-COUNTDOWN down pass of
  ``_core`` (``_sparse_rows``, KIND_T): the kept neurons' rows of w_down_t, gathered BLOCK_I rows a
  step, into an fp32 [H] register accumulator;
- the programs' accumulators meet through ``_core._reduce_programs`` (fp32 atomics into the persistent
  zero-on-exit workspace; the last program casts and re-zeroes).

Shapes and layout (H hidden, I intermediate):
    x         [H], [1, H] or [1, 1, H]: one token; bf16, fp16 or fp32
    w_in_ts   [w_gate_t, w_up_t], each [H, I] contiguous (W^T: input channel j's weights are row j), or
              one [H, 2I] contiguous gate_up (gate columns first); x's dtype
    w_down_t  [I, H] contiguous (W_down^T: neuron i's weights are row i); x's dtype
    thr_in, thr_coef  Python floats or 1-element float tensors on x's device (read by the kernel, so one
              CUDA graph serves every threshold)
    channel_scales  None (TEAL) or (s_in [H], s_coef [I]), contiguous fp32 (WINA: column norms of W_gate
              and W_down); the kernel tests |t_i| > thr_coef / s_coef_i, the same test up to rounding
    y         x's shape and dtype; fp32 accumulation throughout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from . import _core
from .input_sparse import input_sparse_linear, input_sparse_linears
from .input_sparse_prefetch import _mma
from .pack import ACTIVATIONS, MAX_HIDDEN, SUPPORTED_DTYPES, check_act, check_threshold
from .reference import activation

__all__ = ["FfnConfig", "input_sparse_ffn", "input_sparse_ffn_unavailable_reason", "FUSE"]

# Whether one token runs the one-launch kernel (else the three-launch path). Read at call time, so at
# graph-capture time: one process can A/B it. The environment gives the initial value. Off until it is
# timed on a GPU (bench/step_parts.py per layer, bench/instance_spread.py end to end).
FUSE = os.environ.get("COUNTDOWN_FUSE_TEAL_FFN", "0") == "1"


@triton.jit
def _input_sparse_ffn_kernel(
    x_ptr,             # [H] token
    wg_ptr, wu_ptr,    # [H, I] W_gate^T and W_up^T, row stride W_STRIDE
    wd_ptr,            # [I, H] W_down^T, contiguous
    tin_ptr, tco_ptr,  # [1] thresholds of x and of t (read when THR_PTR)
    sin_ptr, sco_ptr,  # [H], [I] fp32 channel scales of x and of t (read when WINA)
    vec_ptr,           # [I] fp32 scratch: t
    thrv_ptr,          # [I] fp32 scratch: thr_coef / s_coef (written and read when WINA)
    ws_ptr,            # [H] fp32 workspace, zero on entry and on exit
    cnt_ptr,           # [1] int32 ticket, zero on entry and on exit
    out_ptr,           # [H] output, x's dtype
    tin_v, tco_v,      # float thresholds (when not THR_PTR)
    H, I, W_STRIDE, NPP,
    ACT: tl.constexpr, THR_PTR: tl.constexpr, WINA: tl.constexpr, H_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_I: tl.constexpr, CHUNK: tl.constexpr,
    PIPE: tl.constexpr, F32: tl.constexpr, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    _core._pdl_prologue(PDL)
    if THR_PTR:
        thr_in = tl.load(tin_ptr).to(tl.float32)
        thr_co = tl.load(tco_ptr).to(tl.float32)
    else:
        thr_in = tin_v
        thr_co = tco_v
    start = pid * NPP
    end = tl.minimum(start + NPP, I)
    cols = start + tl.arange(0, BLOCK_N)
    cm = cols < end

    # phase 1: gate and up of this program's neurons over the kept input channels
    rows0 = tl.arange(0, 16)
    kr = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, H, BLOCK_K, num_stages=NUM_STAGES):
        ch = k + kr
        chm = ch < H
        xv = tl.load(x_ptr + ch, mask=chm, other=0.0, eviction_policy="evict_last")
        score = tl.abs(xv.to(tl.float32))
        if WINA:
            score = score * tl.load(sin_ptr + ch, mask=chm, other=0.0, eviction_policy="evict_last")
        keep = (score > thr_in) & chm
        xa = tl.where((rows0[:, None] == 0) & keep[None, :], xv[None, :], tl.zeros_like(xv)[None, :])
        woff = ch.to(tl.int64)[:, None] * W_STRIDE + cols[None, :]
        wm = keep[:, None] & cm[None, :]
        g = tl.load(wg_ptr + woff, mask=wm, other=0.0, eviction_policy="evict_first")
        u = tl.load(wu_ptr + woff, mask=wm, other=0.0, eviction_policy="evict_first")
        acc_g = _mma(acc_g, xa, g, F32)
        acc_u = _mma(acc_u, xa, u, F32)
    gate = tl.sum(tl.where(rows0[:, None] == 0, acc_g, 0.0), axis=0)  # [BLOCK_N]
    up = tl.sum(tl.where(rows0[:, None] == 0, acc_u, 0.0), axis=0)
    tl.store(vec_ptr + cols, _core._act(gate, ACT) * up, mask=cm)
    if WINA:  # |t_i| * s_i > thr  <=>  |t_i| > thr / s_i: _sparse_rows' per-neuron thresholds
        tl.store(thrv_ptr + cols, thr_co / tl.load(sco_ptr + cols, mask=cm, other=1.0), mask=cm)
    tl.debug_barrier()  # phase 2 reads t written by other threads of this program

    # phase 2: the kept neurons' rows of W_down^T
    hoffs = tl.arange(0, H_PAD)
    hm = hoffs < H
    acc = tl.zeros([H_PAD], dtype=tl.float32)
    acc = _core._sparse_rows(acc, start, end, vec_ptr, thr_co, thrv_ptr, 0.0, hoffs, hm, H, wd_ptr, wd_ptr, wd_ptr,
                             _core.KIND_T, False, False, WINA, ACT, BLOCK_I, CHUNK, PIPE)
    _core._reduce_programs(acc, pid, ws_ptr, cnt_ptr, out_ptr, hoffs, hm, H, H_PAD, 2, 1)


@dataclasses.dataclass(frozen=True)
class FfnConfig:
    """Launch parameters of ``_input_sparse_ffn_kernel``.

    programs_per_sm: the neurons are split into about this many programs per SM (NPP a multiple of 16).
    block_k: input channels per phase-1 step; num_stages: phase-1 pipeline depth.
    block_i, chunk, pipe: phase 2, as ``_core.KernelConfig``."""

    programs_per_sm: int = 1
    block_k: int = 64
    num_stages: int = 3
    num_warps: int = 8
    block_i: int = 4
    chunk: int = 128
    pipe: bool = False


# Untimed first choice: one program per SM (as the other one-launch FFN kernels), 64-channel steps.
_GPU_CONFIG = FfnConfig()
_INTERPRET_CONFIG = FfnConfig(programs_per_sm=3, block_k=16, num_stages=1, num_warps=4, chunk=16)


def pick_config(device: torch.device) -> FfnConfig:
    return _GPU_CONFIG if device.type == "cuda" else _INTERPRET_CONFIG


def _grid(cfg: FfnConfig, inter: int, device: torch.device) -> tuple[int, int]:
    """(programs, neurons per program)."""
    target = max(1, cfg.programs_per_sm * _core._num_sms(device))
    # a multiple of 16: Triton then knows every column offset and bound is, and loads 16-byte vectors
    npp = triton.cdiv(triton.cdiv(inter, target), 16) * 16
    return triton.cdiv(inter, npp), npp


def _split_in(w_in_ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_gate^T, W_up^T) [H, I] views from [gate_t, up_t] or one [H, 2I] gate_up."""
    if len(w_in_ts) == 2:
        return w_in_ts[0], w_in_ts[1]
    inter = w_in_ts[0].shape[1] // 2
    return w_in_ts[0][:, :inter], w_in_ts[0][:, inter:]


def _launch(x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, w_down_t: torch.Tensor,
            thr_in: Optional[torch.Tensor], thr_in_v: float, thr_co: Optional[torch.Tensor], thr_co_v: float,
            act: str, scale_in: Optional[torch.Tensor] = None, scale_co: Optional[torch.Tensor] = None,
            config: Optional[FfnConfig] = None) -> torch.Tensor:
    """Run the kernel on validated arguments: x [H] contiguous; returns y [H]."""
    inter, hidden = w_down_t.shape
    device = x.device
    cfg = config or pick_config(device)
    programs, npp = _grid(cfg, inter, device)
    ws = _core._persistent_workspace(device, hidden + 1)
    wina = scale_in is not None
    vec = torch.empty(2 * inter if wina else inter, dtype=torch.float32, device=device)
    out = torch.empty(hidden, dtype=x.dtype, device=device)
    thr_ptr = thr_in is not None
    _input_sparse_ffn_kernel[(programs,)](
        x, w_gate_t, w_up_t, w_down_t, thr_in if thr_ptr else ws, thr_co if thr_ptr else ws,
        scale_in if wina else vec, scale_co if wina else vec, vec, vec[inter:] if wina else vec,
        ws[:hidden].view(torch.float32), ws[hidden:], out, float(thr_in_v), float(thr_co_v),
        hidden, inter, w_gate_t.stride(0), npp,
        ACT=ACTIVATIONS.index(act), THR_PTR=thr_ptr, WINA=wina, H_PAD=triton.next_power_of_2(hidden),
        BLOCK_N=max(16, triton.next_power_of_2(npp)), BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
        BLOCK_I=cfg.block_i, CHUNK=cfg.chunk, PIPE=cfg.pipe,
        F32=x.dtype == torch.float32 or device.type != "cuda",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_core.pdl_meta(device),
    )
    return out


def _impl(x: torch.Tensor, w_gate_t: torch.Tensor, w_up_t: torch.Tensor, w_down_t: torch.Tensor,
          thr_in: Optional[torch.Tensor], thr_in_v: float, thr_co: Optional[torch.Tensor], thr_co_v: float,
          act: str, scale_in: Optional[torch.Tensor], scale_co: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch(x, w_gate_t, w_up_t, w_down_t, thr_in, thr_in_v, thr_co, thr_co_v, act, scale_in, scale_co)


_op = torch.library.custom_op("countdown::input_sparse_ffn", _impl, mutates_args=())


@_op.register_fake
def _(x, w_gate_t, w_up_t, w_down_t, thr_in, thr_in_v, thr_co, thr_co_v, act, scale_in, scale_co):
    return x.new_empty(w_down_t.shape[1])


def input_sparse_ffn_unavailable_reason(x: torch.Tensor, w_in_ts: Sequence[torch.Tensor],
                                        w_down_t: torch.Tensor) -> str | None:
    """None when the one-launch kernel serves these arguments, else why not (``input_sparse_ffn`` then
    takes the three-launch path, which has its own checks)."""
    if not isinstance(x, torch.Tensor) or not isinstance(w_down_t, torch.Tensor):
        return "x and w_down_t must be torch.Tensors"
    if not isinstance(w_in_ts, (list, tuple)) or len(w_in_ts) not in (1, 2):
        return "w_in_ts must be [w_gate_t, w_up_t] or [w_gate_up_t]"
    if x.dtype not in SUPPORTED_DTYPES or w_down_t.dtype != x.dtype:
        return f"dtypes x {x.dtype} / w_down_t {w_down_t.dtype} not supported (bf16, fp16 or fp32, matching)"
    if x.device.type != "cuda" and not _core.interpret_mode():
        return f"tensors are on {x.device.type}, the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if w_down_t.dim() != 2 or not w_down_t.is_contiguous():
        return f"w_down_t must be a contiguous [I, H], got shape {tuple(w_down_t.shape)}"
    inter, hidden = w_down_t.shape
    if x.dim() == 0 or x.shape[-1] != hidden:
        return f"x has shape {tuple(x.shape)}; its last dimension must be H = {hidden}"
    if x.numel() != hidden:
        return f"x holds {x.numel() // hidden} tokens; the one-launch kernel serves one"
    widths = [2 * inter] if len(w_in_ts) == 1 else [inter, inter]
    for w, width in zip(w_in_ts, widths):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (hidden, width):
            return f"input-major weights must be [{hidden}, {width}], got {getattr(w, 'shape', None)}"
        if w.dtype != x.dtype or w.device != x.device or not w.is_contiguous():
            return f"input-major weights must be contiguous {x.dtype} on {x.device}"
    if w_down_t.device != x.device:
        return f"w_down_t is on {w_down_t.device}, x on {x.device}"
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN} (the kernel holds an output row in registers)"
    if 2 * hidden * inter >= 2**31:
        return f"weights of {hidden}x{2 * inter} elements exceed int32 indexing"
    return None


def _check_scales(channel_scales, hidden: int, inter: int, device: torch.device):
    """(s_in, s_coef) or (None, None), validated."""
    if channel_scales is None:
        return None, None
    if not isinstance(channel_scales, (list, tuple)) or len(channel_scales) != 2:
        raise ValueError("channel_scales must be None or (s_in [H], s_coef [I])")
    for name, sc, n in (("s_in", channel_scales[0], hidden), ("s_coef", channel_scales[1], inter)):
        if not isinstance(sc, torch.Tensor) or sc.dtype != torch.float32:
            raise TypeError(f"channel_scales: {name} must be a float32 tensor")
        if sc.shape != (n,) or not sc.is_contiguous() or sc.device != device:
            raise ValueError(f"channel_scales: {name} must be a contiguous [{n}] tensor on {device}, "
                             f"got {tuple(sc.shape)} on {sc.device}")
    return channel_scales[0], channel_scales[1]


def input_sparse_ffn(x: torch.Tensor, w_in_ts: Sequence[torch.Tensor], w_down_t: torch.Tensor,
                     thr_in: float | torch.Tensor, thr_coef: float | torch.Tensor, *, act: str = "silu",
                     channel_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """TEAL's (channel_scales=None) or WINA's gated FFN on decode tokens; see the module docstring. One
    token with ``FUSE``: one launch; otherwise (2-16 tokens) ``input_sparse_linears`` on the input-major
    gate and up, ``act(gate) * up`` in x's dtype, and ``input_sparse_linear`` on w_down_t. Returns x's
    shape and dtype."""
    check_act(act)
    if isinstance(w_down_t, torch.Tensor) and w_down_t.dim() == 2:
        s_in, s_co = _check_scales(channel_scales, w_down_t.shape[1], w_down_t.shape[0], w_down_t.device)
    else:
        s_in = s_co = None
    if FUSE and input_sparse_ffn_unavailable_reason(x, w_in_ts, w_down_t) is None:
        tin, tin_v = check_threshold(thr_in, x.device)
        tco, tco_v = check_threshold(thr_coef, x.device)
        if (tin is None) != (tco is None):
            raise TypeError("thr_in and thr_coef must both be floats or both 1-element tensors")
        w_gate_t, w_up_t = _split_in(w_in_ts)
        run = _core.op_or_impl(_op, _impl)
        y = run(x.reshape(-1).contiguous(), w_gate_t, w_up_t, w_down_t, tin, tin_v, tco, tco_v, act, s_in, s_co)
        return y.reshape(x.shape)
    projections = input_sparse_linears(x, list(w_in_ts), thr_in, channel_scale=s_in)
    g, u = projections if len(projections) == 2 else projections[0].chunk(2, dim=-1)
    return input_sparse_linear(activation(g, act) * u, w_down_t, thr_coef, channel_scale=s_co)
