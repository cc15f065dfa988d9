"""The one Triton kernel behind every sparse-FFN op, its launcher and its launch configurations.

Every op in this package is the same computation with different inputs known in advance:

    y[h] = sum over kept neurons i of  t_i * w_down_t[i, h]        t_i = act(g_i) * u_i
    g = W_gate x,  u = W_up x                                        (batch-1 decode, x is [H])

A neuron is *kept* when its score passes the threshold. The ops differ only in which vector decides
the mask (``KIND``) and whether that vector is given or computed densely inside the kernel
(``COMPUTE``):

    KIND  vector v       kept when               rows gathered for kept neurons    t_i
    0     t  (coeff.)     |v_i| > thr_i           w_down_t                          v_i
    1     g  (gate pre)   score(v_i) > thr_i      w_up, w_down_t                    act(v_i) * (W_up[i] . x)
    2     u  (up out)     score(v_i) > thr_i      w_gate, w_down_t                  act(W_gate[i] . x) * v_i
    3     predictor       v_i > thr_i (signed)    w_gate, w_up, w_down_t            act(g_i) * u_i

score(v) is |v| by default, |act(v)| with ``SCORE_ACT`` (CATS) and v itself with ``SIGNED`` (DejaVu
keeps the largest signed gate pre-activations; the predictor path is always signed). The threshold
is one scalar for every neuron (a float argument, or a 1-element tensor read by the kernel), or with
``THR_VEC`` a per-neuron fp32 vector thr [I], loaded beside the scores (4 bytes a neuron against the
2-3 weight rows of 2H bytes each that the neuron costs, so ~0.01% more bytes): methods whose score
is a per-neuron rescaling of one of the scores above (CHESS: |act(g_i)|·E|u_i| > τ, S-COUNTDOWN:
½ t_i² ‖W_down[:, i]‖² > τ) are the same kernel with thr_i = τ / E|u_i| or sqrt(2τ) / ‖W_down[:, i]‖.

With ``COMPUTE`` the kernel first computes v densely for its own neurons (KIND 0: gate and up rows,
KIND 1: gate rows, KIND 2: up rows) into an fp32 scratch vector, then runs the sparse phase on it.

Work split (persistent, no tiling over H): about one program per SM. Each program keeps the whole
output row y[0:H] as an fp32 register accumulator (``H_PAD`` = next power of two >= H lanes) and
owns a contiguous range of NPP neurons. Phase 2 compacts the kept neurons of
each ``CHUNK`` of scores in registers (cumsum of the mask) and gathers their rows ``BLOCK_I`` at a
time, so every step loads BLOCK_I kept rows; rows that are not kept are never addressed (no memory
traffic). With ``COMPUTE`` and ``INTERLEAVE``, phase 1 and phase 2 alternate chunk by chunk; with
``PIPE`` phase 2 requests the rows of step k+1 before reducing step k.
At the end each program adds its accumulator into an fp32 workspace with relaxed (vectorised)
atomics; the last program to finish (atomic ticket) casts the total to the output dtype and zeroes the
persistent workspace again (``_runtime.split_k_epilogue``), so one launch yields the bf16/fp16 result.
That is the bf16 answer: accumulate in fp32, cast once. Under ``torch.use_deterministic_algorithms``
(``_runtime.deterministic()``) every program stores its row in a workspace slice of its own instead
(``ORDERED``) and the launcher sums the rows in order: the same result bit for bit on every call.

Weight layout (see ``pack.py``): W_gate [I, H] and W_up [I, H] are nn.Linear weights (row-major,
a neuron = one contiguous row); W_down is stored transposed, ``w_down_t`` [I, H] row-major, so a
neuron's down column is one contiguous row too. All weights share x's dtype (bf16, fp16 or fp32).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import _runtime
from ._runtime import num_sms, pdl_meta, pdl_prologue, persistent_workspace, split_k_epilogue
from .pack import ACTIVATIONS

KIND_T, KIND_GATE, KIND_UP, KIND_SCORE = 0, 1, 2, 3

# Triton decides between compiled and interpreted kernels when a function is decorated, for its own
# library functions (tl.sum, tl.sigmoid, ...) at `import triton`: TRITON_INTERPRET must be set before
# triton is first imported (tests/kernels/conftest.py does so when there is no GPU).


@triton.jit
def _act(v, ACT: tl.constexpr):
    """Activation on fp32 values; ACT indexes pack.ACTIVATIONS: 0 silu, 1 gelu (tanh approximation),
    2 gelu (erf), 3 relu."""
    if ACT == 0:
        r = v * tl.sigmoid(v)
    elif ACT == 1:
        # 0.5 v (1 + tanh(z)) == v * sigmoid(2 z),  z = sqrt(2/pi) (v + 0.044715 v^3)
        r = v * tl.sigmoid(1.5957691216057308 * (v + 0.044715 * v * v * v))
    elif ACT == 2:
        r = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    else:
        r = tl.maximum(v, 0.0)
    return r


@triton.jit
def _keep(v, thr, SIGNED: tl.constexpr, SCORE_ACT: tl.constexpr, ACT: tl.constexpr):
    """Mask of kept neurons from the fp32 vector v (see the table in the module docstring); thr is a
    scalar or a vector broadcastable to v (per-neuron thresholds)."""
    if SCORE_ACT:
        s = _act(v, ACT)
    else:
        s = v
    if not SIGNED:
        s = tl.abs(s)
    return s > thr


@triton.jit
def _thresholds(thr, thr_ptr, idx, inr, THR_VEC: tl.constexpr):
    """The thresholds of neurons idx (valid where inr): the per-neuron vector's entries, or the scalar."""
    if THR_VEC:
        t = tl.load(thr_ptr + idx, mask=inr, other=0.0, eviction_policy="evict_last")
    else:
        t = thr
    return t


@triton.jit
def _dense_rows(vec_ptr, wg_ptr, wu_ptr, xv, hoffs, hm, H, lo, hi,
                KIND: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Phase 1 over neurons [lo, hi): vec[i] = gate_i (KIND 1), up_i (KIND 2) or t_i (KIND 0), fp32,
    BLOCK_D rows a step."""
    dr = tl.arange(0, BLOCK_D)
    r = lo
    while r < hi:
        rows = r + dr
        rm = rows < hi
        roff = rows.to(tl.int64)[:, None] * H + hoffs[None, :]
        m2 = rm[:, None] & hm[None, :]
        if KIND != 2:
            cur_g = tl.load(wg_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
        if KIND != 1:
            cur_u = tl.load(wu_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
        if KIND == 0:
            g = tl.sum(cur_g.to(tl.float32) * xv[None, :], axis=1)
            u = tl.sum(cur_u.to(tl.float32) * xv[None, :], axis=1)
            v = _act(g, ACT) * u
        elif KIND == 1:
            v = tl.sum(cur_g.to(tl.float32) * xv[None, :], axis=1)
        else:
            v = tl.sum(cur_u.to(tl.float32) * xv[None, :], axis=1)
        tl.store(vec_ptr + rows, v, mask=rm)
        r += BLOCK_D


@triton.jit
def _select(pos, keep, idx, v, kk):
    """Neuron index and vector value of the kept neurons of rank kk [BLOCK_I] within a chunk
    (pos: rank of each kept neuron of the chunk). Ranks with no neuron give row 0, value 0."""
    sel = (pos[None, :] == kk[:, None]) & keep[None, :]  # [BLOCK_I, CHUNK]
    rows = tl.sum(tl.where(sel, idx[None, :], 0), axis=1)
    vr = tl.sum(tl.where(sel, v[None, :], 0.0), axis=1)
    return rows, vr


@triton.jit
def _load_rows(rows, rm, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr, KIND: tl.constexpr):
    """The row tiles [BLOCK_I, H_PAD] a step of phase 2 needs: (down, gate-or-up, up) rows."""
    roff = rows.to(tl.int64)[:, None] * H + hoffs[None, :]
    m2 = rm[:, None] & hm[None, :]
    d = tl.load(wd_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
    if KIND == 1:
        a = tl.load(wu_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
    else:
        a = tl.load(wg_ptr + roff, mask=m2 & (KIND != 0), other=0.0, eviction_policy="evict_first")
    b = tl.load(wu_ptr + roff, mask=m2 & (KIND == 3), other=0.0, eviction_policy="evict_first")
    return d, a, b


@triton.jit
def _consume(acc, d, a, b, rm, vr, xv, KIND: tl.constexpr, ACT: tl.constexpr):
    """acc += sum_r t_r * d[r] with t from the table (a, b: the gathered gate / up rows)."""
    if KIND == 0:
        t = vr
    elif KIND == 1:
        t = _act(vr, ACT) * tl.sum(a.to(tl.float32) * xv[None, :], axis=1)
    elif KIND == 2:
        t = _act(tl.sum(a.to(tl.float32) * xv[None, :], axis=1), ACT) * vr
    else:
        g = tl.sum(a.to(tl.float32) * xv[None, :], axis=1)
        u = tl.sum(b.to(tl.float32) * xv[None, :], axis=1)
        t = _act(g, ACT) * u
    t = tl.where(rm, t, 0.0)
    return acc + tl.sum(t[:, None] * d.to(tl.float32), axis=0)


@triton.jit
def _sparse_rows(acc, lo, hi, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                 KIND: tl.constexpr, SCORE_ACT: tl.constexpr, SIGNED: tl.constexpr, THR_VEC: tl.constexpr,
                 ACT: tl.constexpr, BLOCK_I: tl.constexpr, CHUNK: tl.constexpr, PIPE: tl.constexpr):
    """Phase 2 over neurons [lo, hi): adds the kept neurons' t_i * w_down_t[i] to acc [H_PAD].

    The scores of CHUNK neurons are loaded at once and their kept neurons compacted in registers
    (rank = cumsum of the mask); BLOCK_I kept rows are then gathered per step. With PIPE the rows
    of step k+1 are requested before step k is reduced (two steps of loads in flight)."""
    cr = tl.arange(0, CHUNK)
    kr = tl.arange(0, BLOCK_I)
    c = lo
    while c < hi:
        idx = c + cr
        inr = idx < hi
        v = tl.load(vec_ptr + idx, mask=inr, other=0.0).to(tl.float32)
        keep = _keep(v, _thresholds(thr, thr_ptr, idx, inr, THR_VEC), SIGNED, SCORE_ACT, ACT) & inr
        ki = keep.to(tl.int32)
        pos = tl.cumsum(ki, axis=0) - 1  # rank of each kept neuron within the chunk
        n = tl.sum(ki, axis=0)
        if PIPE:
            rows, vr = _select(pos, keep, idx, v, kr)
            rm = kr < n
            d, a, b = _load_rows(rows, rm, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr, KIND)
            k0 = 0
            while k0 < n:
                kn = k0 + BLOCK_I + kr
                rows_n, vr_n = _select(pos, keep, idx, v, kn)
                rm_n = kn < n  # all false past the last step: no traffic
                d_n, a_n, b_n = _load_rows(rows_n, rm_n, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr, KIND)
                acc = _consume(acc, d, a, b, rm, vr, xv, KIND, ACT)
                d, a, b, rm, vr = d_n, a_n, b_n, rm_n, vr_n
                k0 += BLOCK_I
        else:
            k0 = 0
            while k0 < n:
                kk = k0 + kr
                rows, vr = _select(pos, keep, idx, v, kk)
                rm = kk < n
                d, a, b = _load_rows(rows, rm, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr, KIND)
                acc = _consume(acc, d, a, b, rm, vr, xv, KIND, ACT)
                k0 += BLOCK_I
        c += CHUNK
    return acc


@triton.jit
def _sparse_ffn_kernel(
    x_ptr,      # [H]  input token, weight dtype
    vec_ptr,    # [I]  given vector (t / gate / up / predictor score, any float dtype) or fp32 scratch
    wg_ptr,     # [I, H] W_gate, row-major
    wu_ptr,     # [I, H] W_up, row-major
    wd_ptr,     # [I, H] W_down transposed (w_down_t), row-major
    thr_ptr,    # [1]  threshold tensor (read when THR_PTR), or [I] fp32 per-neuron thresholds (THR_VEC)
    ws_ptr,     # [H]  fp32 accumulation workspace, zero on entry and exit; ORDERED: [programs, H] slices
    cnt_ptr,    # [1]  int32 ticket counter, zero on entry and exit (not ORDERED)
    out_ptr,    # [H]  output, written by the last program (not ORDERED)
    thr_value,  # float threshold (when not THR_PTR)
    H, I, NPP,  # hidden size, intermediate size, neurons per program (static split)
    KIND: tl.constexpr, COMPUTE: tl.constexpr, SCORE_ACT: tl.constexpr, SIGNED: tl.constexpr, ACT: tl.constexpr,
    THR_PTR: tl.constexpr, THR_VEC: tl.constexpr, H_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr, CHUNK: tl.constexpr, INTERLEAVE: tl.constexpr, PIPE: tl.constexpr,
    ORDERED: tl.constexpr, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pdl_prologue(PDL)
    if THR_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    hoffs = tl.arange(0, H_PAD)
    hm = hoffs < H
    xv = tl.load(x_ptr + hoffs, mask=hm, other=0.0, eviction_policy="evict_last").to(tl.float32)
    acc = tl.zeros([H_PAD], dtype=tl.float32)
    start = pid * NPP
    end = tl.minimum(start + NPP, I)
    if COMPUTE:
        # Static split; phase 1 (dense vector into fp32 scratch) then phase 2 on it. INTERLEAVE runs
        # the two phases chunk by chunk, so the latency-bound gathers of one program overlap the
        # streaming of the others instead of all programs gathering at the end.
        if INTERLEAVE:
            c = start
            while c < end:
                ce = tl.minimum(c + CHUNK, end)
                _dense_rows(vec_ptr, wg_ptr, wu_ptr, xv, hoffs, hm, H, c, ce, KIND, ACT, BLOCK_D)
                tl.debug_barrier()  # the chunk's scratch, written by other threads of this program
                acc = _sparse_rows(acc, c, ce, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                                   KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)
                c += CHUNK
        else:
            _dense_rows(vec_ptr, wg_ptr, wu_ptr, xv, hoffs, hm, H, start, end, KIND, ACT, BLOCK_D)
            tl.debug_barrier()
            acc = _sparse_rows(acc, start, end, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                               KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)
    else:
        acc = _sparse_rows(acc, start, end, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                           KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)

    if ORDERED:  # deterministic: this program's own row, summed in order by the launcher
        tl.store(ws_ptr + pid * H + hoffs, acc, mask=hm)
    else:
        split_k_epilogue(acc, ws_ptr + hoffs, out_ptr + hoffs, hm, cnt_ptr, tl.num_programs(0))


# --------------------------------------------------------------------------------------------
# launch configuration


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of ``_sparse_ffn_kernel`` (see the module docstring for their roles).

    programs_per_sm: grid = programs_per_sm * number of SMs (capped by the neuron count).
    block_d: dense rows per phase-1 step.  block_i: kept rows per phase-2 step.
    chunk: scores compacted at a time (and, with interleave, phase-1 rows between phase-2 steps).
    interleave: (computed vector) alternate phase 1 and phase 2 chunk by chunk.
    pipe: phase 2 loads step k+1 while reducing step k.
    """

    programs_per_sm: int = 1
    block_d: int = 4
    block_i: int = 4
    chunk: int = 64
    num_warps: int = 8
    interleave: bool = False
    pipe: bool = False


# Chosen from the sweeps of bench/ffn_kernels.py on an H100, Llama-3-8B shape (docs/KERNELS.md has the
# numbers). Keyed by (kind, compute): one configuration per path, whatever the sparsity, so that a
# kernel captured in a CUDA graph is right for every token.
_GPU_CONFIGS: dict[tuple[int, bool], KernelConfig] = {
    (KIND_T, False): KernelConfig(block_i=4, chunk=128),
    (KIND_T, True): KernelConfig(interleave=True, block_d=4, block_i=4, chunk=64),
    (KIND_GATE, False): KernelConfig(programs_per_sm=2, block_i=4, chunk=256),
    (KIND_GATE, True): KernelConfig(block_d=8, block_i=4, chunk=128),
    (KIND_UP, False): KernelConfig(programs_per_sm=2, block_i=4, chunk=256),
    (KIND_UP, True): KernelConfig(block_d=8, block_i=4, chunk=128),
    (KIND_SCORE, False): KernelConfig(block_i=2, chunk=256, num_warps=16, pipe=True),
}

_INTERPRET_CONFIG = KernelConfig(programs_per_sm=3, block_d=4, block_i=4, chunk=16, num_warps=4)


def pick_config(kind: int, compute: bool, hidden: int, inter: int, device: torch.device) -> KernelConfig:
    """The launch configuration used by the public ops for this path and shape."""
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    cfg = _GPU_CONFIGS[(kind, compute)]
    if triton.next_power_of_2(hidden) >= 8192 and cfg.num_warps < 16:
        # keep the per-thread share of the H-wide accumulator and row tiles the same
        cfg = dataclasses.replace(cfg, num_warps=cfg.num_warps * 2)
    return cfg


def launch(
    kind: int,
    compute: bool,
    x: torch.Tensor,
    vec: torch.Tensor | None,
    w_gate: torch.Tensor | None,
    w_up: torch.Tensor | None,
    w_down_t: torch.Tensor,
    threshold: torch.Tensor | None,
    threshold_value: float,
    act: str,
    score_act: bool,
    out_dtype: torch.dtype,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
    *,
    signed: bool = False,
    pdl: bool = True,
) -> torch.Tensor:
    """Run the kernel; arguments are assumed validated (see the public ops). Returns y [H].

    x [H] contiguous; vec [I] contiguous (ignored and replaced by fp32 scratch when ``compute``);
    w_gate, w_up, w_down_t [I, H] contiguous (a weight the path does not read may be None);
    threshold: 1-element tensor on x's device, or an [I] contiguous fp32 tensor of per-neuron
    thresholds (or None, then ``threshold_value`` is used). score_act / signed: the score (table above).
    config: launch parameters (default: ``pick_config``). out: optional [H] output buffer (tests
    poison it to check that every element is written). pdl: programmatic dependent launch where the GPU
    has it (`countdown.KernelPolicy.pdl`).
    """
    inter, hidden = w_down_t.shape
    device = w_down_t.device
    cfg = config or pick_config(kind, compute, hidden, inter, device)
    thr_vec = is_threshold_vector(threshold)
    programs = max(1, min(cfg.programs_per_sm * num_sms(device), triton.cdiv(inter, cfg.block_i)))
    npp = triton.cdiv(inter, programs)
    programs = triton.cdiv(inter, npp)
    if compute:
        vec = torch.empty(inter, dtype=torch.float32, device=device)
    ws = persistent_workspace(device, hidden + 1)  # fp32 y, then the int32 ticket
    acc_ws = ws[:hidden].view(torch.float32)
    counter = ws[hidden:]
    rows = _runtime.ordered_workspace(programs, hidden, device)  # deterministic mode: one row per program
    if out is None:
        out = torch.empty(hidden, dtype=out_dtype, device=device)
    w_gate = w_down_t if w_gate is None else w_gate
    w_up = w_down_t if w_up is None else w_up
    _sparse_ffn_kernel[(programs,)](
        x, vec, w_gate, w_up, w_down_t, counter if threshold is None else threshold,
        acc_ws if rows is None else rows, counter, out, float(threshold_value), hidden, inter, npp,
        KIND=kind, COMPUTE=compute, SCORE_ACT=score_act, SIGNED=signed or kind == KIND_SCORE,
        ACT=ACTIVATIONS.index(act), THR_PTR=threshold is not None and not thr_vec, THR_VEC=thr_vec,
        H_PAD=triton.next_power_of_2(hidden), BLOCK_D=cfg.block_d, BLOCK_I=cfg.block_i, CHUNK=cfg.chunk,
        INTERLEAVE=cfg.interleave and compute, PIPE=cfg.pipe, ORDERED=rows is not None,
        num_warps=cfg.num_warps, num_stages=1, **pdl_meta(device, pdl),
    )
    if rows is not None:
        return out.copy_(rows.view(programs, hidden).sum(0))
    return out


def is_threshold_vector(threshold: torch.Tensor | None) -> bool:
    """Whether a validated threshold tensor holds one threshold per neuron (else one for all). A
    1-element vector for I = 1 counts as a scalar: both mean the same."""
    return threshold is not None and threshold.numel() > 1
