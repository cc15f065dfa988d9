"""Batched decode (2 to 16 tokens) for every sparse-FFN op: per-token masks, union rows read once.

The public ops (``gather_ffn``, ``fused_gather_ffn``, ``sparse_down``, ``coefficient_ffn``,
``predicted_sparse_ffn``) send a batch of B = 2..16 tokens here; one token keeps the batch-1 kernel
of ``_core``. For token b (H hidden, I intermediate, ``kind`` as in ``_core``):

    keep[b, i]  = token b's own score of neuron i passes the threshold
    t[b, i]     = the coefficient of neuron i for token b (table in ``_core``)
    y[b, :]     = sum over i with keep[b, i] of t[b, i] * w_down_t[i, :]
    union[i]    = keep[0, i] or ... or keep[B-1, i]

Every weight row of a neuron in the union is read once for the whole batch; rows of neurons no
token keeps are never addressed; a neuron kept by token 1 only adds nothing to token 2's output.

Two launches (one for ``sparse_down``), both memory-bound matrix products on the tensor cores:

1. ``_coef_kernel``, one program per ``block_i`` neurons. Score: the given vector ([B, I], read from
   memory) or, with ``compute``, the dense projection of the program's rows (x [B, H] times the rows
   [block_i, H] of W_gate or W_up, or both for the D-COUNTDOWN ideal path), ``block_k`` columns a
   step, fp32 ``tl.dot``. Then the per-token mask [block_i, B] and its union; the rows of the other
   matrix (or both, for the predictor path) are loaded with the union as row mask, so a row nobody
   keeps costs no memory traffic, and dotted with all B tokens at once. The coefficients, zero where
   a token does not keep the neuron, go to an fp32 scratch ``coef`` [B, I].
2. ``_down_kernel``, split-K over neurons: program (p, j) owns neurons [p NPP, (p+1) NPP) and output
   columns [j h_tile, (j+1) h_tile), holds acc [16, h_tile] fp32 and, ``block_n`` neurons a step,
   loads their coefficients [B, block_n] (``coef``, or ``sparse_down``'s t masked by |t| > thr),
   takes as union the neurons with a non-zero coefficient for some token (a kept neuron with t == 0
   adds nothing) and adds coef @ w_down_t[rows, columns] with the rows masked by that union. At the
   end it adds acc into an fp32 workspace [B, H] with relaxed atomics; the last of the programs of
   column tile j (atomic ticket per tile) casts the tile to the output dtype and zeroes it again, so
   the workspace is zero between calls (a persistent one per device, as in ``_core``). Under
   ``torch.use_deterministic_algorithms`` each split stores acc in a [B, H] slice of its own and the
   launcher sums the slices in order instead (bitwise-repeatable results).
   ``_down_compact_kernel`` (``BatchConfig.compact``) is the same split-K product over the union rows
   only: each program first packs the indices of its union neurons into its own region of an int32
   scratch (coefficients ``scan_elems`` at a time, union flag, cumsum for the packed position), then
   loads ``block_n`` packed rows a step, so every step but the last is a full tile. The masked walk
   takes NPP / block_n dependent steps however few rows are kept (latency-bound when the union is
   small, B = 2..4); the packed one takes union * NPP / block_n. ``pick_config`` gives it to batches
   of at most ``compact_max_batch`` tokens (`countdown.KernelPolicy.compact_max_batch`, default
   ``COMPACT_MAX_BATCH``).

fp32 accumulation: bf16/fp16 coefficients enter the tensor cores as hi + lo, two products with the
same weight tile (coef = hi + lo exactly to ~16 bits), so the down projection keeps fp32-quality
coefficients; x and the weights are exact in their own dtype. fp32 weights use IEEE fp32 dots, and
so does Triton's CPU interpreter (its bf16 ``tl.dot`` is wrong), so the hi/lo split is checked on
the GPU only (bench/batch_kernels.py).
The batch is padded to 16 (the smallest ``tl.dot`` side): rows b >= B are masked, so they cost
arithmetic only, no memory traffic.

Why this is never slower than the dense FFN. The union of B independent masks at sparsity s keeps
1 - s^B of the rows (s=0.9: 19% at B=2, 81% at B=16), so at large B the sparse path reads nearly
every row. Both kernels are then plain skinny GEMMs in the weights' row-major layout: a fully kept
block is a full-width tile load, so the path streams like the dense GEMM (the masked walk: no
per-row work beyond the masked load; the compact kernel adds only its packing prologue). No dense
fallback is needed, and none that would need a host sync to decide: the mask is applied per
block of rows on the device, and reading a block whose rows are all kept costs what the dense GEMM
costs. The fixed costs over cuBLAS are the workspace atomics (P * B * H fp32 adds, P ~ 16 neuron
splits) and the per-tile tickets, a few us.

Shapes and layouts: x [B, H] contiguous in the weights' dtype; vec [B, I] contiguous (gate / up
projection, predictor score, or t; any float dtype, or uint8 for a bool mask with threshold 0.5);
w_gate, w_up, w_down_t [I, H] contiguous row-major (``countdown.ffn.use_input_major`` lays W_down out); threshold a 1-element
fp32 tensor (read on the device: one CUDA graph serves every threshold), a Python float, or an [I]
fp32 tensor of per-neuron thresholds shared by the tokens (CHESS, S-COUNTDOWN; loaded with the
scores, I floats). The score is |v|, |act(v)| or the signed v, as in ``_core``. Scratch: coef [B, I]
fp32 (per call), the down workspace [16 H] fp32 + [NH] int32 tickets and (compact) the packed indices
[NH * NS * NPP] int32 (persistent per device; NS neuron splits, NH column tiles). Output
[B, H] in the weights' dtype. No host synchronisation anywhere (CUDA-graph capturable).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _core, _runtime
from ._core import KIND_GATE, KIND_SCORE, KIND_T, KIND_UP, _act, _keep, _thresholds
from .pack import ACTIVATIONS, MAX_BATCH, interpret_mode

B_PAD = tl.constexpr(MAX_BATCH)  # the batch padded to one tile (16: tl.dot's smallest side)


@triton.jit
def _scalar_threshold(thr_ptr, thr_value, THR_PTR: tl.constexpr):
    """The one threshold of every neuron: read from the 1-element tensor (THR_PTR) or the float argument."""
    if THR_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    return thr


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b: tensor-core dot in the operands' dtype, or (IEEE) an fp32 dot of fp32 copies."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _project(w1_ptr, w2_ptr, x_ptr, rows, rmask, rb, bm, H,
             TWO: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
             STAGES: tl.constexpr, EVEN_K: tl.constexpr):
    """(w1[rows] @ x.T, w2[rows] @ x.T), each [BLOCK_I, B_PAD] fp32 (the second only when TWO).
    Rows outside rmask are not read and give zeros; x [B, H] is read transposed, BLOCK_K a step."""
    acc1 = tl.zeros([BLOCK_I, B_PAD], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_I, B_PAD], dtype=tl.float32)
    roff = rows.to(tl.int64)[:, None] * H
    for k in tl.range(0, H, BLOCK_K, num_stages=STAGES):
        kk = k + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no column mask: the loads stay vectorised along the row
            xt = tl.load(x_ptr + rb[None, :] * H + kk[:, None], mask=bm[None, :], other=0.0)
            m2 = rmask[:, None]
        else:
            km = kk < H
            xt = tl.load(x_ptr + rb[None, :] * H + kk[:, None], mask=km[:, None] & bm[None, :], other=0.0)
            m2 = rmask[:, None] & km[None, :]
        w1 = tl.load(w1_ptr + roff + kk[None, :], mask=m2, other=0.0, eviction_policy="evict_first")
        acc1 = _dot(w1, xt, acc1, IEEE)
        if TWO:
            w2 = tl.load(w2_ptr + roff + kk[None, :], mask=m2, other=0.0, eviction_policy="evict_first")
            acc2 = _dot(w2, xt, acc2, IEEE)
    return acc1, acc2


@triton.jit
def _coef_kernel(
    x_ptr,      # [B, H]  tokens, weight dtype
    vec_ptr,    # [B, I]  given score vector (read unless COMPUTE)
    wg_ptr,     # [I, H]  W_gate
    wu_ptr,     # [I, H]  W_up
    thr_ptr,    # [1]     threshold (read when THR_PTR), or [I] fp32 per-neuron thresholds (THR_VEC)
    coef_ptr,   # [B, I]  fp32 out: t[b, i] where token b keeps neuron i, else 0
    thr_value, B, H, I,
    KIND: tl.constexpr, COMPUTE: tl.constexpr, SCORE_ACT: tl.constexpr, SIGNED: tl.constexpr, ACT: tl.constexpr,
    THR_PTR: tl.constexpr, THR_VEC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    STAGES: tl.constexpr, EVEN_K: tl.constexpr,
):
    thr = _scalar_threshold(thr_ptr, thr_value, THR_PTR)
    rows = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    im = rows < I
    rb = tl.arange(0, B_PAD)
    bm = rb < B
    valid = im[:, None] & bm[None, :]
    vptr = rb[None, :] * I + rows[:, None]  # [BLOCK_I, B_PAD] offsets into a [B, I] array

    # the score vector v [BLOCK_I, B_PAD]: given, or the dense projection(s) of this program's rows
    if COMPUTE:
        if KIND == 0:
            g, u = _project(wg_ptr, wu_ptr, x_ptr, rows, im, rb, bm, H, True, BLOCK_I, BLOCK_K, IEEE, STAGES, EVEN_K)
            v = _act(g, ACT) * u
        elif KIND == 1:
            v, _unused = _project(wg_ptr, wg_ptr, x_ptr, rows, im, rb, bm, H, False, BLOCK_I, BLOCK_K, IEEE,
                                  STAGES, EVEN_K)
        else:
            v, _unused = _project(wu_ptr, wu_ptr, x_ptr, rows, im, rb, bm, H, False, BLOCK_I, BLOCK_K, IEEE,
                                  STAGES, EVEN_K)
    else:
        v = tl.load(vec_ptr + vptr, mask=valid, other=0.0).to(tl.float32)
    thr_rows = _thresholds(thr, thr_ptr, rows, im, THR_VEC)
    if THR_VEC:
        thr_rows = thr_rows[:, None]  # one threshold per neuron, shared by the tokens
    keep = _keep(v, thr_rows, SIGNED, SCORE_ACT, ACT) & valid
    union = tl.max(keep.to(tl.int32), axis=1) > 0

    # the sparse projection(s), over the union rows only
    if KIND == 0:
        t = v
    elif KIND == 1:
        u, _unused = _project(wu_ptr, wu_ptr, x_ptr, rows, union, rb, bm, H, False, BLOCK_I, BLOCK_K, IEEE,
                              STAGES, EVEN_K)
        t = _act(v, ACT) * u
    elif KIND == 2:
        g, _unused = _project(wg_ptr, wg_ptr, x_ptr, rows, union, rb, bm, H, False, BLOCK_I, BLOCK_K, IEEE,
                              STAGES, EVEN_K)
        t = _act(g, ACT) * v
    else:
        g, u = _project(wg_ptr, wu_ptr, x_ptr, rows, union, rb, bm, H, True, BLOCK_I, BLOCK_K, IEEE, STAGES, EVEN_K)
        t = _act(g, ACT) * u
    tl.store(coef_ptr + vptr, tl.where(keep, t, 0.0), mask=valid)


@triton.jit
def _given_coefs(v, thr, thr_ptr, rows, rm, GIVEN_T: tl.constexpr, THR_VEC: tl.constexpr):
    """The coefficients [*, n] of neurons rows [n]: v as is (exact, zero = not kept), or (GIVEN_T) t
    with the tokens' entries |t| <= their neuron's threshold zeroed."""
    if GIVEN_T:
        if THR_VEC:
            v = tl.where(tl.abs(v) > _thresholds(thr, thr_ptr, rows, rm, True)[None, :], v, 0.0)
        else:
            v = tl.where(tl.abs(v) > thr, v, 0.0)
    return v


@triton.jit
def _down_dot(v, w, acc, IEEE: tl.constexpr):
    """acc + v @ w for fp32 coefficients v [B_PAD, n] and a weight tile w [n, H_TILE]: one IEEE fp32
    dot, or two tensor-core dots of the hi and lo halves of v in w's dtype (fp32-quality v)."""
    if IEEE:
        acc = _dot(v, w, acc, True)
    else:
        v_hi = v.to(w.dtype)
        v_lo = (v - v_hi.to(tl.float32)).to(w.dtype)
        acc = tl.dot(v_hi, w, acc)
        acc = tl.dot(v_lo, w, acc)
    return acc


@triton.jit
def _split_k_sum(acc, ws_ptr, cnt_ptr, out_ptr, rb, bm, hs, hm, B, H, pid_h, H_TILE: tl.constexpr,
                 ORDERED: tl.constexpr):
    """Adds this program's acc [B_PAD, H_TILE] into the fp32 workspace; the last program of column tile
    pid_h (atomic ticket) writes the tile's total to out and leaves workspace and ticket zero. ORDERED
    (deterministic mode): stores acc into its split's own [B, H] slice of ws instead, for the launcher
    to sum the slices in order."""
    offs = rb[:, None] * H + hs[None, :]
    om = bm[:, None] & hm[None, :]
    if ORDERED:
        tl.store(ws_ptr + tl.program_id(0) * B * H + offs, acc, mask=om)
    else:
        _runtime.split_k_epilogue(acc, ws_ptr + offs, out_ptr + offs, om, cnt_ptr + pid_h, tl.num_programs(0))


@triton.jit
def _down_kernel(
    vec_ptr,    # [B, I]  coefficients: exact (GIVEN_T false, zero = not kept) or t masked by |t| > thr
    wd_ptr,     # [I, H]  w_down_t
    thr_ptr,    # [1]     threshold (GIVEN_T and THR_PTR), or [I] fp32 per-neuron thresholds (GIVEN_T and THR_VEC)
    ws_ptr,     # [B, H]  fp32 workspace, zero on entry and on exit
    cnt_ptr,    # [NH]    int32 tickets, one per column tile, zero on entry and on exit
    out_ptr,    # [B, H]  output
    thr_value, B, H, I, NPP,
    GIVEN_T: tl.constexpr, THR_PTR: tl.constexpr, THR_VEC: tl.constexpr, H_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, STAGES: tl.constexpr, ORDERED: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    thr = _scalar_threshold(thr_ptr, thr_value, GIVEN_T and THR_PTR)
    rb = tl.arange(0, B_PAD)
    bm = rb < B
    hs = pid_h * H_TILE + tl.arange(0, H_TILE)
    hm = hs < H
    lo = pid_n * NPP
    hi = tl.minimum(lo + NPP, I)
    acc = tl.zeros([B_PAD, H_TILE], dtype=tl.float32)
    for c in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        rows = c + tl.arange(0, BLOCK_N)
        rm = rows < hi
        v = tl.load(vec_ptr + rb[:, None] * I + rows[None, :], mask=bm[:, None] & rm[None, :], other=0.0)
        v = _given_coefs(v.to(tl.float32), thr, thr_ptr, rows, rm, GIVEN_T, THR_VEC)
        union = tl.max((v != 0.0).to(tl.int32), axis=0) > 0
        w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * H + hs[None, :], mask=union[:, None] & hm[None, :],
                    other=0.0, eviction_policy="evict_first")
        acc = _down_dot(v, w, acc, IEEE)
    _split_k_sum(acc, ws_ptr, cnt_ptr, out_ptr, rb, bm, hs, hm, B, H, pid_h, H_TILE, ORDERED)


@triton.jit
def _down_compact_kernel(
    vec_ptr,    # [B, I]  coefficients, as in _down_kernel
    wd_ptr,     # [I, H]  w_down_t
    thr_ptr,    # [1] or [I] fp32 thresholds, as in _down_kernel
    idx_ptr,    # [NH * NS * NPP] int32 scratch (no initial value): program (p, j) packs the indices of
                #         its union neurons at [(j NS + p) NPP, (j NS + p) NPP + count), ascending
    ws_ptr,     # [B, H]  fp32 workspace, zero on entry and on exit
    cnt_ptr,    # [NH]    int32 tickets, one per column tile, zero on entry and on exit
    out_ptr,    # [B, H]  output
    thr_value, B, H, I, NPP,
    GIVEN_T: tl.constexpr, THR_PTR: tl.constexpr, THR_VEC: tl.constexpr, H_TILE: tl.constexpr, BLOCK_N: tl.constexpr,
    B_SCAN: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr, STAGES: tl.constexpr,
    ORDERED: tl.constexpr = False,
):
    """``_down_kernel`` over the union rows only, packed first: every step loads BLOCK_N union rows.

    Grid (NS, NH) as in ``_down_kernel``: program (p, j) owns neurons [p NPP, (p+1) NPP) and output
    columns [j H_TILE, (j+1) H_TILE). Prologue: the coefficients [B_SCAN, CHUNK] of CHUNK neurons a
    step (B_SCAN = the batch padded to a power of two), the union flag of each neuron (a non-zero
    coefficient for some token), its packed position (running count + cumsum of the flags), and the
    index of every union neuron stored there in ``idx_ptr``. A CTA barrier makes those stores visible
    to all its threads (the region is this program's own: no other program reads or writes it). Main
    loop: for packed positions [c, c + BLOCK_N) < count, the indices, the gathered coefficients
    [B_PAD, BLOCK_N] (re-thresholded with GIVEN_T: a union neuron is not kept by every token) and the
    rows w_down_t[idx, columns], all full except the last step. Neurons are summed in ascending order
    within a program; the split-K epilogue is ``_split_k_sum``.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    thr = _scalar_threshold(thr_ptr, thr_value, GIVEN_T and THR_PTR)
    lo = pid_n * NPP
    hi = tl.minimum(lo + NPP, I)
    packed = idx_ptr + (pid_h * tl.num_programs(0) + pid_n).to(tl.int64) * NPP

    # prologue: pack the union neurons of [lo, hi)
    sb = tl.arange(0, B_SCAN)
    sbm = sb < B
    count = 0
    for c in tl.range(lo, hi, CHUNK):
        rows = c + tl.arange(0, CHUNK)
        rm = rows < hi
        v = tl.load(vec_ptr + sb[:, None] * I + rows[None, :], mask=sbm[:, None] & rm[None, :], other=0.0)
        v = _given_coefs(v.to(tl.float32), thr, thr_ptr, rows, rm, GIVEN_T, THR_VEC)
        flag = (tl.max((v != 0.0).to(tl.int32), axis=0) > 0) & rm
        fi = flag.to(tl.int32)
        pos = count + tl.cumsum(fi, axis=0) - 1
        tl.store(packed + pos, rows, mask=flag)
        count += tl.sum(fi, axis=0)
    tl.debug_barrier()  # the packed indices, stored by other threads of this CTA

    rb = tl.arange(0, B_PAD)
    bm = rb < B
    hs = pid_h * H_TILE + tl.arange(0, H_TILE)
    hm = hs < H
    acc = tl.zeros([B_PAD, H_TILE], dtype=tl.float32)
    for c in tl.range(0, count, BLOCK_N, num_stages=STAGES):
        k = c + tl.arange(0, BLOCK_N)
        km = k < count
        rows = tl.load(packed + k, mask=km, other=0)
        v = tl.load(vec_ptr + rb[:, None] * I + rows[None, :], mask=bm[:, None] & km[None, :], other=0.0)
        v = _given_coefs(v.to(tl.float32), thr, thr_ptr, rows, km, GIVEN_T, THR_VEC)
        w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * H + hs[None, :], mask=km[:, None] & hm[None, :],
                    other=0.0, eviction_policy="evict_first")
        acc = _down_dot(v, w, acc, IEEE)
    _split_k_sum(acc, ws_ptr, cnt_ptr, out_ptr, rb, bm, hs, hm, B, H, pid_h, H_TILE, ORDERED)


# --------------------------------------------------------------------------------------------
# launch configuration


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Launch parameters of the two batched kernels (see the module docstring).

    block_i, block_k: neurons per program and columns per step of ``_coef_kernel``.
    h_tile, block_n: output columns per program and neurons per step of the down kernel.
    down_programs: target number of down-kernel programs (neuron splits x column tiles).
    stages: software-pipelining depth of the inner loops.
    compact: the down kernel packs each program's union neurons first (``_down_compact_kernel``),
        so that every step loads block_n union rows, instead of masking the rows of block_n neurons.
    scan_elems: (compact) coefficients [batch padded to a power of two, chunk] loaded per step of the
        packing prologue; the chunk is scan_elems / that batch, at most the program's neurons.
    """

    block_i: int = 64
    block_k: int = 128
    coef_warps: int = 4
    h_tile: int = 256
    block_n: int = 64
    down_programs: int = 264
    down_warps: int = 4
    stages: int = 3
    compact: bool = False
    scan_elems: int = 4096


GPU_CONFIG = BatchConfig()
# The compacting down kernel's configuration, and the largest batch that uses it (0: none, every
# batch runs GPU_CONFIG). Few tokens keep few union rows (1 - s^B), where the masked walk of
# ``_down_kernel`` is latency-bound. Measured on the H100 (bench/batch_kernels.py --down-variants,
# docs/BENCHMARKS.md, 2026-11-23; "c32_dp396"): M-COUNTDOWN fused at s = 0.9 1.19x faster at B = 2 and
# 1.10x at B = 4, D-COUNTDOWN practical 1.33x / 1.14x; at s = 0.7 1.02x at B = 2 and 1-2% slower at
# B = 4; slower from B = 8 on (the prologue and the gathered tiles cost more than the walk saves once
# the union holds most rows). Chosen by batch size, as the kernel cannot see the union before launch.
GPU_COMPACT_CONFIG = BatchConfig(compact=True, block_n=32, down_programs=396)
COMPACT_MAX_BATCH = 4  # the default of `countdown.KernelPolicy.compact_max_batch`
_INTERPRET_CONFIG = BatchConfig(block_i=16, block_k=16, h_tile=32, block_n=16, down_programs=6, stages=1)
_INTERPRET_COMPACT_CONFIG = dataclasses.replace(_INTERPRET_CONFIG, compact=True, scan_elems=64)


def pick_config(device: torch.device, batch: int = MAX_BATCH,
                compact_max_batch: int = COMPACT_MAX_BATCH) -> BatchConfig:
    """The configuration the public ops use for a batch of ``batch`` tokens on ``device``: the compact
    down kernel up to ``compact_max_batch`` tokens."""
    compact = batch <= compact_max_batch
    if device.type != "cuda":
        return _INTERPRET_COMPACT_CONFIG if compact else _INTERPRET_CONFIG
    return GPU_COMPACT_CONFIG if compact else GPU_CONFIG


def _down_grid(hidden: int, inter: int, cfg: BatchConfig) -> tuple[int, int, int]:
    """(neuron splits, column tiles, neurons per split)."""
    nh = triton.cdiv(hidden, cfg.h_tile)
    splits = max(1, min(cfg.down_programs // nh, triton.cdiv(inter, cfg.block_n)))
    npp = triton.cdiv(triton.cdiv(inter, splits), cfg.block_n) * cfg.block_n
    return triton.cdiv(inter, npp), nh, npp


# The compact down kernel's index scratch, one per (device, size); like the workspace it is shared by
# the kernels of one stream, which run one after another. It needs no initial value.
_INDEX_SCRATCH: dict[tuple[str, int | None, int], torch.Tensor] = {}


def _index_scratch(device: torch.device, size: int) -> torch.Tensor:
    key = (device.type, device.index, size)
    if key not in _INDEX_SCRATCH:
        _INDEX_SCRATCH[key] = torch.empty(size, dtype=torch.int32, device=device)
    return _INDEX_SCRATCH[key]


def launch(kind: int, compute: bool, x: torch.Tensor | None, vec: torch.Tensor | None,
           w_gate: torch.Tensor | None, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
           threshold: torch.Tensor | None, threshold_value: float, act: str, score_act: bool,
           config: BatchConfig | None = None, out: torch.Tensor | None = None, *,
           signed: bool = False, compact_max_batch: int = COMPACT_MAX_BATCH) -> torch.Tensor:
    """Run the batched path; arguments are assumed validated (see the public ops). Returns y [B, H].

    x [B, H] contiguous (None for ``sparse_down``: kind KIND_T without compute); vec [B, I]
    contiguous (ignored when ``compute``); weights [I, H] contiguous (one the path does not read may
    be None); threshold a 1-element tensor on the device, an [I] contiguous fp32 tensor of
    per-neuron thresholds (the same for every token), or None to use ``threshold_value``.
    score_act / signed: the score, as in ``_core``. config: launch parameters (default: ``pick_config``
    with ``compact_max_batch``).
    """
    inter, hidden = w_down_t.shape
    device, dtype = w_down_t.device, w_down_t.dtype
    batch = (x if x is not None else vec).shape[0]
    cfg = config or pick_config(device, batch, compact_max_batch)
    # fp32 weights get IEEE dots; so does Triton's interpreter, whose bf16 tl.dot is wrong (3.9)
    ieee = dtype == torch.float32 or interpret_mode()
    thr_arg = threshold if threshold is not None else w_down_t  # any pointer; not read
    thr_vec = _core.is_threshold_vector(threshold)
    thr_ptr = threshold is not None and not thr_vec
    if kind == KIND_T and not compute:
        coef, given_t = vec, True
    else:
        coef, given_t = torch.empty(batch, inter, dtype=torch.float32, device=device), False
        wg = w_down_t if w_gate is None else w_gate
        wu = w_down_t if w_up is None else w_up
        _coef_kernel[(triton.cdiv(inter, cfg.block_i),)](
            x, x if vec is None else vec, wg, wu, thr_arg, coef, float(threshold_value), batch, hidden, inter,
            KIND=kind, COMPUTE=compute, SCORE_ACT=score_act, SIGNED=signed or kind == KIND_SCORE,
            ACT=ACTIVATIONS.index(act), THR_PTR=thr_ptr, THR_VEC=thr_vec, BLOCK_I=cfg.block_i, BLOCK_K=cfg.block_k, IEEE=ieee,
            STAGES=cfg.stages, EVEN_K=hidden % cfg.block_k == 0, num_warps=cfg.coef_warps)
    splits, nh, npp = _down_grid(hidden, inter, cfg)
    pad = B_PAD.value
    ws = _runtime.persistent_workspace(device, pad * hidden + nh)
    acc_ws = ws[: pad * hidden].view(torch.float32)
    counters = ws[pad * hidden:]
    if out is None:
        out = torch.empty(batch, hidden, dtype=dtype, device=device)
    parts = _runtime.ordered_workspace(splits, batch * hidden, device)
    if parts is not None:
        acc_ws = parts
    common = dict(GIVEN_T=given_t, THR_PTR=thr_ptr, THR_VEC=thr_vec and given_t, H_TILE=cfg.h_tile,
                  BLOCK_N=cfg.block_n, IEEE=ieee, STAGES=cfg.stages, ORDERED=parts is not None, num_warps=cfg.down_warps)
    if cfg.compact:
        b_scan = max(2, triton.next_power_of_2(batch))
        chunk = min(triton.next_power_of_2(npp), max(16, cfg.scan_elems // b_scan))
        idx = _index_scratch(device, splits * nh * npp)
        _down_compact_kernel[(splits, nh)](
            coef, w_down_t, thr_arg, idx, acc_ws, counters, out, float(threshold_value), batch, hidden, inter, npp,
            B_SCAN=b_scan, CHUNK=chunk, **common)
    else:
        _down_kernel[(splits, nh)](
            coef, w_down_t, thr_arg, acc_ws, counters, out, float(threshold_value), batch, hidden, inter, npp,
            **common)
    if parts is not None:
        out.copy_(parts.view(splits, batch, hidden).sum(0))
    return out


# --------------------------------------------------------------------------------------------
# the torch custom op (one for every batched path; the public ops pick kind and compute)


def _batch_impl(x: Optional[torch.Tensor], vec: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                w_up: Optional[torch.Tensor], w_down_t: torch.Tensor, threshold: Optional[torch.Tensor],
                threshold_value: float, act: str, kind: int, compute: bool, score_act: bool,
                signed: bool, compact_max_batch: int = COMPACT_MAX_BATCH) -> torch.Tensor:
    return launch(kind, compute, x, vec, w_gate, w_up, w_down_t, threshold, threshold_value, act, score_act,
                  signed=signed, compact_max_batch=compact_max_batch)


_batch_op = torch.library.custom_op("countdown::batch_sparse_ffn", _batch_impl, mutates_args=())


@_batch_op.register_fake
def _(x, vec, w_gate, w_up, w_down_t, threshold, threshold_value, act, kind, compute, score_act, signed,
      compact_max_batch=COMPACT_MAX_BATCH):
    batch = (x if x is not None else vec).shape[0]
    return w_down_t.new_empty(batch, w_down_t.shape[1])


def batch_sparse_ffn(kind: int, compute: bool, x: torch.Tensor | None, vec: torch.Tensor | None,
                     w_gate: torch.Tensor | None, w_up: torch.Tensor | None, w_down_t: torch.Tensor,
                     threshold: torch.Tensor | None, threshold_value: float, act: str = "silu",
                     score_act: bool = False, signed: bool = False,
                     compact_max_batch: int = COMPACT_MAX_BATCH) -> torch.Tensor:
    """The batched path of the public ops (validated arguments, see ``launch``); y [B, H]."""
    run = _runtime.op_or_impl(_batch_op, _batch_impl)
    return run(x, vec, w_gate, w_up, w_down_t, threshold, threshold_value, act, kind, compute, score_act, signed,
               compact_max_batch)


__all__ = ["COMPACT_MAX_BATCH", "BatchConfig", "GPU_COMPACT_CONFIG", "GPU_CONFIG", "KIND_GATE", "KIND_SCORE", "KIND_T",
           "KIND_UP", "batch_sparse_ffn", "launch", "pick_config"]
