"""Input-sparse GEMV, "prefetch" variant: the keep mask is known before the weight loop starts.

Same function as ``input_sparse.input_sparse_linear`` (and the same pure-torch reference,
``reference.input_sparse_linear``):

    y[b, :] = sum over channels j with score[b, j] > thr of x[b, j] * w_t[j, :]
    score = |x| (TEAL) or |x| * channel_scale (WINA)

Why a second kernel. In the measured one (``input_sparse._input_sparse_kernel``, "walk") the weight
mask of a step depends on an x load of the same step. Triton (3.6 and 3.9, sm_90, K and N multiples
of 16: ``bench/input_sparse_asm.py``) still pipelines that loop, issuing x three steps ahead of the
weights and keeping up to three weight tiles in flight, so the mask-first form below is not expected
to change the steady state much; what it adds is a mask that is known for the whole channel range
before the first weight load, which makes long programs (no channel split at all: no atomics, no
ticket, no read-back after the loop) and one launch for several weights (q, k, v) simple. Each
program first loads its whole x slice, tests it, and packs the union of the tokens' keep masks into
one bit word per step (bit r of word s: channel lo + s * BLOCK_K + r is kept by some token). Inside
the loop the weight mask comes from that register word and the loop counter, never from a load, and
``tl.range(num_stages=...)`` lets Triton's pipeliner turn the weight (and x) loads into async copies
NUM_STAGES - 1 steps ahead (checked in the sm_90 TTGIR).

x is loaded again inside the loop for the dot's A operand (the same lines the prologue just read: an
L1/L2 hit that no weight load waits on).

One launch can serve up to three weights that share x (q, k and v): ``input_sparse_multi``. The
grid's first axis runs over the N tiles of every weight one after the other, so one launch, one
prologue per program and one partial-sum workspace serve all three outputs. Each weight keeps its own
threshold and channel scale (their masks may differ; the prologue cost is per program anyway).

Shapes and layout (B tokens, K input channels, N output columns of one weight):
    x              [B, K], [B, 1, K] or [K]; B in 1..16; bf16, fp16 or fp32
    w_t            [K, N] contiguous, x's dtype (W^T: input channel j's weights are row j)
    channel_scale  [K] fp32 (WINA) or None (TEAL)
    threshold      Python float, or a 1-element float tensor on the device (read by the kernel)
    y              [B, N] (x's leading shape + [N]) in x's dtype; accumulation is fp32.

Grid: (sum of N tiles of BLOCK_N columns) x (SPLIT contiguous ranges of channels). The split is sized
from N: about ``programs_per_sm`` programs per SM, but never fewer than ``min_kpp`` channels per
program, so a narrow weight (k/v, N = 1024) gets fewer, longer programs instead of 66 two-step ones.
With SPLIT == 1 a program owns the full K of its tile and stores y directly (no atomics, no ticket).
With SPLIT > 1 partials go through the persistent zero-on-exit workspace and a ticket per tile
(``_runtime.split_k_epilogue``); under ``torch.use_deterministic_algorithms`` each split stores them in a slice of its
own instead, and the launcher sums the slices in order (bitwise-repeatable results).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from ..options import KernelPolicy
from .input_sparse_checks import MAX_BATCH, problem as _problem
from .pack import check_threshold

__all__ = ["PrefetchConfig", "input_sparse_multi", "MAX_WEIGHTS"]

MAX_WEIGHTS = 3  # q, k, v
_PROLOGUE_ELEMENTS = 4096  # x values one prologue chunk holds in registers (per program)
MAX_PROLOGUE_CHUNKS = 16  # chunks are a loop: longer ranges mean more x load latencies in the prologue


@triton.jit
def _kept_words(x_ptr, sc_ptr, thr, offs_b, bm, lo, hi, K, s0,
                WINA: tl.constexpr, XS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[XS] int64 bit words for steps s0 .. s0 + XS - 1 of the program's range: bit r of word s is set
    when some token keeps channel lo + s * BLOCK_K + r (channels at or past ``hi`` are never set)."""
    r = tl.arange(0, BLOCK_K)
    ch = lo + (s0 + tl.arange(0, XS))[:, None] * BLOCK_K + r[None, :]  # [XS, BLOCK_K]
    chm = ch < hi
    m3 = bm[:, None, None] & chm[None, :, :]
    xv = tl.load(x_ptr + offs_b[:, None, None] * K + ch[None, :, :], mask=m3, other=0.0,
                 eviction_policy="evict_last")
    score = tl.abs(xv.to(tl.float32))
    if WINA:
        sc = tl.load(sc_ptr + ch, mask=chm, other=0.0, eviction_policy="evict_last")
        score = score * sc[None, :, :]
    keep = (score > thr) & m3  # padding never counts as kept, even for a negative threshold
    union = tl.max(keep.to(tl.int32), axis=0)  # [XS, BLOCK_K]
    # distinct powers of two: the sum is the bitwise or (bit 63 wraps to the sign, harmlessly)
    return tl.sum(union.to(tl.int64) << r.to(tl.int64)[None, :], axis=1)


@triton.jit
def _row_mask(words, sidx, step, kr):
    """[BLOCK_K] bool: the rows of step ``step`` that some token keeps, from the register words
    [NCH, XS] whose step numbers are ``sidx`` [NCH, XS]."""
    word = tl.sum(tl.sum(tl.where(sidx == step, words, 0), axis=1), axis=0)
    return ((word >> kr.to(tl.int64)) & 1) != 0


@triton.jit
def _w_tile(w_ptr, rows, keep_row, offs_n, nm, N):
    """The [BLOCK_K, BLOCK_N] weight tile; rows no token keeps are masked off (never fetched)."""
    return tl.load(w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :], mask=keep_row[:, None] & nm[None, :],
                   other=0.0, eviction_policy="evict_first")


@triton.jit
def _x_tile(x_ptr, sc_ptr, thr, rows, hi, offs_b, bm, K, WINA: tl.constexpr):
    """[B_PAD, BLOCK_K] tokens at ``rows``, zero where that token does not keep the channel."""
    rm = rows < hi
    xm2 = bm[:, None] & rm[None, :]
    xv = tl.load(x_ptr + offs_b[:, None] * K + rows[None, :], mask=xm2, other=0.0, eviction_policy="evict_last")
    s = tl.abs(xv.to(tl.float32))
    if WINA:
        sc = tl.load(sc_ptr + rows, mask=rm, other=0.0, eviction_policy="evict_last")
        s = s * sc[None, :]
    return tl.where((s > thr) & xm2, xv, tl.zeros_like(xv))


@triton.jit
def _mma(acc, xk, w, F32: tl.constexpr):
    if F32:  # fp32 inputs, or any input in the interpreter (whose bf16 dot is wrong in triton 3.9)
        return tl.dot(xk.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(xk, w, acc)


@triton.jit
def _prefetch_kernel(
    x_ptr,                 # [B, K] tokens, contiguous
    w0_ptr, w1_ptr, w2_ptr,  # [K, N_s] W_s^T, contiguous (unused ones: any pointer of the same type)
    s0_ptr, s1_ptr, s2_ptr,  # [K] fp32 channel scales (read when WINA)
    t0_ptr, t1_ptr, t2_ptr,  # [1] threshold tensors (read when THR_PTR)
    o0_ptr, o1_ptr, o2_ptr,  # [B, N_s] outputs, x's dtype
    tv0, tv1, tv2,         # float thresholds (when not THR_PTR)
    ws_ptr,                # fp32 workspace, 16 rows per output column, zero on entry and exit (SPLIT)
    cnt_ptr,               # int32 tickets, one per N tile, zero on entry and exit (SPLIT)
    B, K, N0, N1, N2, KPP,  # tokens, channels, output widths, channels per program
    T0, T1,                # N tiles of weights 0 and 1
    NSEG: tl.constexpr, WINA: tl.constexpr, THR_PTR: tl.constexpr, BP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NCH: tl.constexpr, XS: tl.constexpr,
    SPLIT: tl.constexpr, NUM_STAGES: tl.constexpr, F32: tl.constexpr,
    PDL: tl.constexpr = False, ORDERED: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    _runtime.pdl_prologue(PDL)
    # which weight this N tile belongs to (runtime branch on the program id; all pointers one type)
    w_ptr, sc_ptr, o_ptr, t_ptr, thr_v = w0_ptr, s0_ptr, o0_ptr, t0_ptr, tv0
    N = pid * 0 + N0  # a tensor in every branch, whatever Triton specialised N0 to
    tile = pid
    col0 = pid * 0  # first workspace column of this weight
    if NSEG > 1:
        if pid >= T0:
            w_ptr, sc_ptr, o_ptr, t_ptr, thr_v = w1_ptr, s1_ptr, o1_ptr, t1_ptr, tv1
            N = pid * 0 + N1
            tile = pid - T0
            col0 = pid * 0 + N0
            if NSEG > 2:
                if pid >= T0 + T1:
                    w_ptr, sc_ptr, o_ptr, t_ptr, thr_v = w2_ptr, s2_ptr, o2_ptr, t2_ptr, tv2
                    N = pid * 0 + N2
                    tile = pid - T0 - T1
                    col0 = pid * 0 + N0 + N1
    if THR_PTR:
        thr = tl.load(t_ptr).to(tl.float32)
    else:
        thr = thr_v
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    lo = pid_k * KPP
    hi = tl.minimum(lo + KPP, K)

    # prologue: the kept-row bit words of every step, from x loads that nothing waits on later
    offs_bp = tl.arange(0, BP)
    bmp = offs_bp < B
    # words [NCH, XS]: chunk c of XS steps in row c; sidx holds each word's step number
    cidx = tl.arange(0, NCH)
    sidx = cidx[:, None] * XS + tl.arange(0, XS)[None, :]
    if NCH == 1:
        words = _kept_words(x_ptr, sc_ptr, thr, offs_bp, bmp, lo, hi, K, 0, WINA, XS, BLOCK_K)[None, :]
    else:  # a loop, not unrolled (compile time and registers); its x loads may be pipelined
        words = tl.zeros([NCH, XS], dtype=tl.int64)
        for c in tl.range(0, NCH, num_stages=2):
            cw = _kept_words(x_ptr, sc_ptr, thr, offs_bp, bmp, lo, hi, K, c * XS, WINA, XS, BLOCK_K)
            words = tl.where(cidx[:, None] == c, cw[None, :], words)

    offs_b = tl.arange(0, 16)  # tokens padded to one 16-row MMA tile
    bm = offs_b < B
    kr = tl.arange(0, BLOCK_K)
    acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    for k in tl.range(lo, hi, BLOCK_K, num_stages=NUM_STAGES):
        rows = k + kr
        w = _w_tile(w_ptr, rows, _row_mask(words, sidx, (k - lo) // BLOCK_K, kr), offs_n, nm, N)
        xk = _x_tile(x_ptr, sc_ptr, thr, rows, hi, offs_b, bm, K, WINA)
        acc = _mma(acc, xk, w, F32)

    om = bm[:, None] & nm[None, :]
    off = offs_b[:, None] * N + offs_n[None, :]
    if SPLIT and ORDERED:
        # deterministic: this split's own slice of ws (16 rows per column of every weight), summed in
        # order by the launcher
        n_total = pid * 0 + N0
        if NSEG > 1:
            n_total += N1
            if NSEG > 2:
                n_total += N2
        tl.store(ws_ptr + pid_k * 16 * n_total + 16 * col0 + off, acc, mask=om)
    elif SPLIT:
        _runtime.split_k_epilogue(acc, ws_ptr + 16 * col0 + off, o_ptr + off, om, cnt_ptr + pid, tl.num_programs(1))
    else:
        tl.store(o_ptr + off, acc.to(o_ptr.dtype.element_ty), mask=om)


# --------------------------------------------------------------------------------------------
# launch configuration


@dataclasses.dataclass(frozen=True)
class PrefetchConfig:
    """Launch parameters of ``_prefetch_kernel``.

    block_n: output columns per program.  block_k: channels (rows of w_t) per step, 16 to 64 (one
    bit word per step).  programs_per_sm: the channel split aims at about this many programs per SM
    over all N tiles, but ``min_kpp`` caps it: no program gets fewer channels than that (a narrow N
    gets fewer splits; the split is 1, no atomics, when the N tiles alone fill the GPU).
    max_split: a cap on the split (1: every program owns the full K of its tile), None for none.
    num_stages: pipeliner depth (``tl.range`` pipelining)."""

    block_n: int = 256
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 4
    programs_per_sm: int = 2
    min_kpp: int = 128
    max_split: Optional[int] = None

    def __post_init__(self):
        if self.block_k not in (16, 32, 64):
            raise ValueError(f"block_k must be 16, 32 or 64 (one bit word per step), got {self.block_k}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")


# bench/input_sparse.py --variants times these against the walk kernel on the H100 (docs/BENCHMARKS.md):
# the default config is the "pf" column, used for one token (KernelPolicy.input_sparse "auto") and for q/k/v;
# the wide one ("pf-k64-s3") for a total width past WIDE_N (TEAL's gate + up in one launch: 49.0 µs
# against 58.8 with the default tiles and 54.5 as two launches, batch 1, s = 0.5; a single gate/up or
# down within 1% either way).
_GPU_CONFIG = PrefetchConfig()
_WIDE_CONFIG = PrefetchConfig(block_k=64, num_stages=3)
WIDE_N = 8192
_INTERPRET_CONFIG = PrefetchConfig(block_n=16, block_k=16, num_stages=1, programs_per_sm=4, min_kpp=16)


def pick_config(batch: int, k: int, n_total: int, device: torch.device) -> PrefetchConfig:
    """The launch configuration for B = ``batch`` tokens, K = ``k`` and the weights' summed width."""
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    return _WIDE_CONFIG if n_total > WIDE_N else _GPU_CONFIG


def _prologue_steps(batch: int, block_k: int) -> int:
    """Steps of x one prologue chunk loads (tokens padded to 1 or 16 rows, _PROLOGUE_ELEMENTS values)."""
    return max(1, _PROLOGUE_ELEMENTS // ((1 if batch == 1 else MAX_BATCH) * block_k))


def grid(cfg: PrefetchConfig, k: int, ns: Sequence[int], device: torch.device,
         batch: int = 1) -> tuple[int, int, int]:
    """(N tiles over all weights, channel split, channels per program) for K = k and widths ``ns``.
    A program's range is capped at MAX_PROLOGUE_CHUNKS prologue chunks (its x slice is unrolled)."""
    n_tiles = sum(triton.cdiv(n, cfg.block_n) for n in ns)
    target = cfg.programs_per_sm * _runtime.num_sms(device)
    split = max(1, min(target // n_tiles, triton.cdiv(k, max(cfg.min_kpp, cfg.block_k)), cfg.max_split or k))
    split = max(split, triton.cdiv(k, MAX_PROLOGUE_CHUNKS * _prologue_steps(batch, cfg.block_k) * cfg.block_k))
    kpp = triton.cdiv(triton.cdiv(k, split), cfg.block_k) * cfg.block_k
    return n_tiles, triton.cdiv(k, kpp), kpp


def _workspace(device: torch.device, n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 [16 * n_total], int32 tickets) in one persistent zero-on-exit buffer per total width
    (calls of the same width share it: they run in stream order, and each leaves it zero)."""
    ws = _runtime.persistent_workspace(device, MAX_BATCH * n_total + triton.cdiv(n_total, 16) + MAX_WEIGHTS)
    return ws[: MAX_BATCH * n_total].view(torch.float32), ws[MAX_BATCH * n_total:]


def launch(x: torch.Tensor, w_ts: Sequence[torch.Tensor], channel_scales: Sequence[Optional[torch.Tensor]],
           thresholds: Sequence[Optional[torch.Tensor]], threshold_values: Sequence[float],
           outs: Sequence[torch.Tensor], config: Optional[PrefetchConfig] = None, *, pdl: bool = True) -> None:
    """Run the kernel on validated arguments: x [B, K] contiguous, 1 to 3 weights [K, N_s] sharing x,
    outs [B, N_s]. Channel scales all None or all tensors; thresholds all None (then the float values
    are used) or all tensors. pdl: programmatic dependent launch where the GPU has it."""
    nseg = len(w_ts)
    batch, k = x.shape
    ns = [w.shape[1] for w in w_ts]
    device = x.device
    cfg = config or pick_config(batch, k, sum(ns), device)
    n_tiles, split, kpp = grid(cfg, k, ns, device, batch)
    nstep = triton.next_power_of_2(kpp // cfg.block_k)
    bp = 1 if batch == 1 else MAX_BATCH
    xs = min(nstep, _prologue_steps(batch, cfg.block_k))
    acc_ws, tickets = _workspace(device, sum(ns))
    parts = _runtime.ordered_workspace(split, MAX_BATCH * sum(ns), device)
    if parts is not None:
        acc_ws = parts
    wina = channel_scales[0] is not None
    thr_ptr = thresholds[0] is not None

    def three(seq, fill):
        seq = list(seq)
        return seq + [fill] * (MAX_WEIGHTS - len(seq))

    ws3 = three(w_ts, w_ts[0])
    sc3 = three(channel_scales, channel_scales[0]) if wina else [w_ts[0]] * MAX_WEIGHTS
    th3 = three(thresholds, thresholds[0]) if thr_ptr else [tickets] * MAX_WEIGHTS
    tv3 = three([float(v) for v in threshold_values], 0.0)
    o3 = three(outs, outs[0])
    n3 = three(ns, ns[0])
    t0 = triton.cdiv(ns[0], cfg.block_n)
    t1 = triton.cdiv(ns[1], cfg.block_n) if nseg > 1 else 0
    _prefetch_kernel[(n_tiles, split)](
        x, *ws3, *sc3, *th3, *o3, *tv3, acc_ws, tickets, batch, k, *n3, kpp, t0, t1,
        NSEG=nseg, WINA=wina, THR_PTR=thr_ptr, BP=bp, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NCH=nstep // xs, XS=xs, SPLIT=split > 1, NUM_STAGES=cfg.num_stages,
        F32=x.dtype == torch.float32 or device.type != "cuda", ORDERED=parts is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_runtime.pdl_meta(device, pdl),
    )
    if parts is not None:  # each split's slice: 16 rows per column of every weight, the first B of them written
        slices = parts.view(split, MAX_BATCH * sum(ns))
        col0 = 0
        for n, o in zip(ns, outs):
            o.copy_(slices[:, MAX_BATCH * col0: MAX_BATCH * col0 + batch * n].view(split, batch, n).sum(0))
            col0 += n


# --------------------------------------------------------------------------------------------
# entry point (``input_sparse.input_sparse_linear`` comes here when KernelPolicy.input_sparse says so;
# ``input_sparse_multi`` is itself the registered op ``countdown::input_sparse_multi`` under torch.compile)


def _multi_problem(x, w_ts, thresholds, channel_scales) -> tuple[type[Exception], str] | None:
    if not isinstance(w_ts, (list, tuple)) or not 1 <= len(w_ts) <= MAX_WEIGHTS:
        return ValueError, f"w_ts must be a list of 1 to {MAX_WEIGHTS} weights"
    if len(thresholds) != len(w_ts) or len(channel_scales) != len(w_ts):
        return ValueError, (f"{len(w_ts)} weights need as many thresholds and channel scales, got "
                            f"{len(thresholds)} and {len(channel_scales)}")
    for i, (w_t, sc) in enumerate(zip(w_ts, channel_scales)):
        p = _problem(x, w_t, sc)
        if p is not None:
            return p[0], f"weight {i}: {p[1]}"
    if len({sc is None for sc in channel_scales}) > 1:
        return ValueError, "channel_scales must be all None (TEAL) or all tensors (WINA)"
    if len({isinstance(t, torch.Tensor) for t in thresholds}) > 1:
        return TypeError, "thresholds must be all floats or all 1-element tensors"
    if sum(w.shape[1] for w in w_ts) * MAX_BATCH + 64 >= 2**31:
        return ValueError, "the weights' total width is too large for int32 indexing of the workspace"
    return None


def input_sparse_multi(x: torch.Tensor, w_ts: Sequence[torch.Tensor], thresholds: Sequence[float | torch.Tensor],
                       *, channel_scales: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       outs: Optional[Sequence[torch.Tensor]] = None,
                       config: Optional[PrefetchConfig] = None,
                       policy: KernelPolicy | str | None = None) -> list[torch.Tensor]:
    """[input_sparse_linear(x, w_ts[i], thresholds[i], channel_scale=channel_scales[i]) for each i], in
    one launch (q, k and v of one attention layer: one x, up to three input-major weights).

    x [B, K] / [B, 1, K] / [K] (B <= 16); w_ts: 1 to 3 tensors [K, N_i] contiguous in x's dtype;
    thresholds: one per weight, all Python floats or all 1-element float tensors on x's device;
    channel_scales: None, or one per weight, all None or all [K] fp32; outs: None or one contiguous
    [B, N_i] buffer per weight; config: launch parameters (default: ``pick_config``); policy: its ``pdl``
    (`countdown.KernelPolicy`). Returns the outputs, each with x's leading shape + [N_i]."""
    pdl = KernelPolicy.of(policy).pdl
    w_ts = list(w_ts)
    thresholds = list(thresholds)
    channel_scales = [None] * len(w_ts) if channel_scales is None else list(channel_scales)
    p = _multi_problem(x, w_ts, thresholds, channel_scales)
    if p is not None:
        raise p[0](f"input_sparse_multi: {p[1]}")
    k = w_ts[0].shape[0]
    x2 = x.reshape(-1, k).contiguous()
    batch = x2.shape[0]
    thr = [check_threshold(t, x.device) for t in thresholds]
    if outs is None and config is None:
        # the registered op: one opaque node under torch.compile (attention's fused q/k/v)
        ys = _runtime.op_or_impl(_multi_op, _multi_impl)(x2, w_ts, channel_scales, [t for t, _ in thr],
                                                         [v for _, v in thr], pdl)
        return [y.reshape(*x.shape[:-1], y.shape[1]) for y in ys]
    if outs is None:
        outs2 = [torch.empty(batch, w.shape[1], dtype=x.dtype, device=x.device) for w in w_ts]
    else:
        if len(outs) != len(w_ts):
            raise ValueError(f"input_sparse_multi: {len(w_ts)} weights need {len(w_ts)} outs, got {len(outs)}")
        for o, w in zip(outs, w_ts):
            n = w.shape[1]
            if o.dtype != x.dtype or o.device != x.device or o.numel() != batch * n or not o.is_contiguous():
                raise ValueError(f"input_sparse_multi: out must be a contiguous {x.dtype} tensor of {batch * n} "
                                 f"elements on {x.device}, got {o.dtype} {tuple(o.shape)} on {o.device}")
        outs2 = [o.view(batch, o.numel() // batch) for o in outs]
    _launch_all(x2, w_ts, channel_scales, [t for t, _ in thr], [v for _, v in thr], outs2, config, pdl)
    if outs is not None:
        return list(outs)
    return [o.reshape(*x.shape[:-1], o.shape[1]) for o in outs2]


def _launch_all(x2: torch.Tensor, w_ts: Sequence[torch.Tensor], channel_scales: Sequence[Optional[torch.Tensor]],
                thresholds: Sequence[Optional[torch.Tensor]], threshold_values: Sequence[float],
                outs: Sequence[torch.Tensor], config: Optional[PrefetchConfig], pdl: bool = True) -> None:
    """`launch`, except that a width-1 weight among several runs in its own launch: Triton turns an
    int argument equal to 1 into a constant, and the per-weight branch needs all widths as values of
    one type."""
    if any(w.shape[1] == 1 for w in w_ts) and len(w_ts) > 1:
        for i, w in enumerate(w_ts):
            launch(x2, [w], [channel_scales[i]], [thresholds[i]], [threshold_values[i]], [outs[i]], config, pdl=pdl)
    else:
        launch(x2, w_ts, channel_scales, thresholds, threshold_values, outs, config, pdl=pdl)


def _multi_impl(x: torch.Tensor, w_ts: list[torch.Tensor], channel_scales: list[Optional[torch.Tensor]],
                thresholds: list[Optional[torch.Tensor]], threshold_values: list[float],
                pdl: bool = True) -> list[torch.Tensor]:
    """``countdown::input_sparse_multi`` on validated arguments: x [B, K] contiguous, w_ts 1 to 3
    [K, N_i]; one channel scale per weight, all None (TEAL) or all [K] fp32 (WINA); one threshold per
    weight, all None (then the float ``threshold_values`` are used) or all [1] float tensors; pdl:
    programmatic dependent launch where the GPU has it. Returns fresh [B, N_i] outputs."""
    outs = [torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device) for w in w_ts]
    _launch_all(x, w_ts, channel_scales, thresholds, threshold_values, outs, None, pdl)
    return outs


_multi_op = torch.library.custom_op("countdown::input_sparse_multi", _multi_impl, mutates_args=())


@_multi_op.register_fake
def _(x, w_ts, channel_scales, thresholds, threshold_values, pdl=True):
    return [x.new_empty(x.shape[0], w.shape[1]) for w in w_ts]
