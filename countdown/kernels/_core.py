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
owns a contiguous range of neurons: with a given vector and ``BALANCE``, every program scans the
whole score vector and takes the neurons holding an equal share of the *kept* neurons; otherwise
(and always with ``COMPUTE``) each program gets NPP neurons. Phase 2 compacts the kept neurons of
each ``CHUNK`` of scores in registers (cumsum of the mask) and gathers their rows ``BLOCK_I`` at a
time, so every step loads BLOCK_I kept rows; rows that are not kept are never addressed (no memory
traffic). With ``COMPUTE`` and ``INTERLEAVE``, phase 1 and phase 2 alternate chunk by chunk; with
``PIPE`` phase 2 requests the rows of step k+1 before reducing step k.
At the end each program adds its accumulator into an fp32 workspace with relaxed (vectorised)
atomics; the last program to finish (atomic ticket) casts the total to the output dtype and, with
``FINALIZE`` 2, zeroes the persistent workspace again, so one launch yields the bf16/fp16 result.
That is the bf16 answer: accumulate in fp32, cast once. Under ``torch.use_deterministic_algorithms``
(``deterministic()``) every program adds into a workspace row of its own instead (``NCOPY`` = programs,
``FINALIZE`` 0) and the launcher sums the rows in order: the same result bit for bit on every call.

Weight layout (see ``pack.py``): W_gate [I, H] and W_up [I, H] are nn.Linear weights (row-major,
a neuron = one contiguous row); W_down is stored transposed, ``w_down_t`` [I, H] row-major, so a
neuron's down column is one contiguous row too. All weights share x's dtype (bf16, fp16 or fp32).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .pack import ACTIVATIONS, interpret_mode

KIND_T, KIND_GATE, KIND_UP, KIND_SCORE = 0, 1, 2, 3

# Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the
# kernel before it drains, and waits (``gdc_wait``) before it first touches memory. On by default where
# the GPU and Triton have it (H100, compiled decode step with Inductor's kernels on it too: +2% dense,
# +2.4% M-COUNTDOWN 70% + attention 50%, +5.5% TEAL 50%; bench/pdl_check.py: chained calls of every
# batch-1 kernel match the reference step by step; docs/BENCHMARKS.md). `set_pdl(False)` turns it off.
PDL = True
_TRITON_HAS_PDL = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


def deterministic() -> bool:
    """Whether the split-K kernels must give bitwise-repeatable results: PyTorch's own switch,
    ``torch.use_deterministic_algorithms(True)`` (``warn_only=True`` counts too). Read at launch, so a
    CUDA graph keeps the mode it was captured in.

    By default programs that share outputs add their fp32 partials with atomics, whose order varies from
    run to run, so the last bits of a result (and, through near-tied argmaxes, greedy tokens) may differ
    between two calls. In deterministic mode each program writes its partials to a row of its own and
    they are summed in a fixed order (one extra small reduction per call)."""
    return torch.are_deterministic_algorithms_enabled()


def ordered_workspace(splits: int, numel: int, device: torch.device) -> torch.Tensor | None:
    """In deterministic mode with more than one split: an fp32 buffer of ``splits`` slices of ``numel``
    (each split writes all of its slice, so no zero fill), for the launcher to sum in split order after
    the kernel. Otherwise None: the kernel adds its partials with atomics."""
    if splits > 1 and deterministic():
        return torch.empty(splits * numel, dtype=torch.float32, device=device)
    return None


def set_pdl(on: bool) -> None:
    """Launch the batch-1 decode kernels with programmatic dependent launch where the GPU and Triton have
    it (and, through `countdown.decode.Decoder(compile=True)`, Inductor's kernels too). Read when a
    kernel is launched or a decoder compiled, so a CUDA graph keeps the setting it was captured with."""
    global PDL
    PDL = bool(on)


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch now."""
    return (PDL and _TRITON_HAS_PDL and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def _pdl_prologue(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel's writes are visible, then let the next kernel launch.
    Every program runs it before its first load of anything a previous kernel wrote, and every
    program waits before it signals, so a kernel after this one never overtakes the one before."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()



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
                KIND: tl.constexpr, ACT: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr):
    """Phase 1 over neurons [lo, hi): vec[i] = gate_i (KIND 1), up_i (KIND 2) or t_i (KIND 0), fp32.

    BLOCK_D rows a step; with PREFETCH the rows of step k+1 are loaded before step k is reduced."""
    dr = tl.arange(0, BLOCK_D)
    r = lo
    if PREFETCH:
        rows = r + dr
        rm = rows < hi
        roff = rows.to(tl.int64)[:, None] * H + hoffs[None, :]
        m2 = rm[:, None] & hm[None, :]
        if KIND != 2:
            nxt_g = tl.load(wg_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
        if KIND != 1:
            nxt_u = tl.load(wu_ptr + roff, mask=m2, other=0.0, eviction_policy="evict_first")
    while r < hi:
        rows = r + dr
        rm = rows < hi
        roff = rows.to(tl.int64)[:, None] * H + hoffs[None, :]
        m2 = rm[:, None] & hm[None, :]
        if PREFETCH:
            if KIND != 2:
                cur_g = nxt_g
            if KIND != 1:
                cur_u = nxt_u
            m2n = ((rows + BLOCK_D) < hi)[:, None] & hm[None, :]
            if KIND != 2:
                nxt_g = tl.load(wg_ptr + roff + BLOCK_D * H, mask=m2n, other=0.0, eviction_policy="evict_first")
            if KIND != 1:
                nxt_u = tl.load(wu_ptr + roff + BLOCK_D * H, mask=m2n, other=0.0, eviction_policy="evict_first")
        else:
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
    ws_ptr,     # [NCOPY, H] fp32 accumulation workspace, zero on entry (FINALIZE 2 leaves it zero)
    cnt_ptr,    # [1]  int32 ticket counter, zero on entry (FINALIZE >= 1)
    out_ptr,    # [H]  output, written by the last program (FINALIZE >= 1)
    thr_value,  # float threshold (when not THR_PTR)
    H, I, NPP,  # hidden size, intermediate size, neurons per program (static split)
    KIND: tl.constexpr, COMPUTE: tl.constexpr, SCORE_ACT: tl.constexpr, SIGNED: tl.constexpr, ACT: tl.constexpr,
    THR_PTR: tl.constexpr, THR_VEC: tl.constexpr, H_PAD: tl.constexpr, I_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr, CHUNK: tl.constexpr, BALANCE: tl.constexpr, INTERLEAVE: tl.constexpr,
    PREFETCH: tl.constexpr, FINALIZE: tl.constexpr, NCOPY: tl.constexpr, PIPE: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    _pdl_prologue(PDL)
    if THR_PTR:
        thr = tl.load(thr_ptr).to(tl.float32)
    else:
        thr = thr_value
    hoffs = tl.arange(0, H_PAD)
    hm = hoffs < H
    xv = tl.load(x_ptr + hoffs, mask=hm, other=0.0, eviction_policy="evict_last").to(tl.float32)
    acc = tl.zeros([H_PAD], dtype=tl.float32)

    if COMPUTE:
        # Static split; phase 1 (dense vector into fp32 scratch) then phase 2 on it. INTERLEAVE runs
        # the two phases chunk by chunk, so the latency-bound gathers of one program overlap the
        # streaming of the others instead of all programs gathering at the end.
        start = pid * NPP
        end = tl.minimum(start + NPP, I)
        if INTERLEAVE:
            c = start
            while c < end:
                ce = tl.minimum(c + CHUNK, end)
                _dense_rows(vec_ptr, wg_ptr, wu_ptr, xv, hoffs, hm, H, c, ce, KIND, ACT, BLOCK_D, PREFETCH)
                tl.debug_barrier()  # the chunk's scratch, written by other threads of this program
                acc = _sparse_rows(acc, c, ce, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                                   KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)
                c += CHUNK
        else:
            _dense_rows(vec_ptr, wg_ptr, wu_ptr, xv, hoffs, hm, H, start, end, KIND, ACT, BLOCK_D, PREFETCH)
            tl.debug_barrier()
            acc = _sparse_rows(acc, start, end, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                               KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)
    else:
        if BALANCE:
            # Every program scans the whole score vector (L2-resident after the first) and takes the
            # neurons holding kept ranks [K*pid/P, K*(pid+1)/P): equal kept rows per program.
            ioffs = tl.arange(0, I_PAD)
            im = ioffs < I
            va = tl.load(vec_ptr + ioffs, mask=im, other=0.0).to(tl.float32)
            ka = (_keep(va, _thresholds(thr, thr_ptr, ioffs, im, THR_VEC), SIGNED, SCORE_ACT, ACT) & im).to(tl.int32)
            cum = tl.cumsum(ka, axis=0)
            total = tl.sum(ka, axis=0)
            nprog = tl.num_programs(0)
            start = tl.sum(((cum <= (pid * total) // nprog) & im).to(tl.int32), axis=0)
            end = tl.sum(((cum <= ((pid + 1) * total) // nprog) & im).to(tl.int32), axis=0)
        else:
            start = pid * NPP
            end = tl.minimum(start + NPP, I)
        acc = _sparse_rows(acc, start, end, vec_ptr, thr, thr_ptr, xv, hoffs, hm, H, wg_ptr, wu_ptr, wd_ptr,
                           KIND, SCORE_ACT, SIGNED, THR_VEC, ACT, BLOCK_I, CHUNK, PIPE)

    _reduce_programs(acc, pid, ws_ptr, cnt_ptr, out_ptr, hoffs, hm, H, H_PAD, FINALIZE, NCOPY)


@triton.jit
def _reduce_programs(acc, pid, ws_ptr, cnt_ptr, out_ptr, hoffs, hm, H, H_PAD: tl.constexpr, FINALIZE: tl.constexpr,
                     NCOPY: tl.constexpr):
    """The reduction over programs of an output row: each program adds its fp32 ``acc`` [H_PAD] into the
    workspace ``ws_ptr`` [NCOPY, H] with relaxed atomics; with FINALIZE the last program to take the
    ticket ``cnt_ptr`` [1] casts the totals into ``out_ptr`` [H] (and with FINALIZE 2 zeroes the
    workspace and the ticket again). Program p adds into copy p % NCOPY: NCOPY copies divide the adds
    that land on one address (they serialise in L2), for NCOPY reads in the last program."""
    tl.atomic_add(ws_ptr + (pid % NCOPY) * H + hoffs, acc, mask=hm, sem="relaxed")
    if FINALIZE > 0:
        tl.debug_barrier()  # every thread's adds precede this program's ticket
        ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            # atomic reads: the totals live in L2, where the other programs' adds landed
            tot = tl.zeros([H_PAD], dtype=tl.float32)
            for g in tl.static_range(NCOPY):
                tot += tl.atomic_add(ws_ptr + g * H + hoffs, tl.zeros([H_PAD], dtype=tl.float32), mask=hm,
                                     sem="relaxed")
            if FINALIZE == 2:  # leave the workspace zero for the next call (every add is done)
                for g in tl.static_range(NCOPY):
                    tl.store(ws_ptr + g * H + hoffs, tl.zeros([H_PAD], dtype=tl.float32), mask=hm)
                tl.store(cnt_ptr, 0)
            tl.store(out_ptr + hoffs, tot.to(out_ptr.dtype.element_ty), mask=hm)


# --------------------------------------------------------------------------------------------
# launch configuration


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of ``_sparse_ffn_kernel`` (see the module docstring for their roles).

    programs_per_sm: grid = programs_per_sm * number of SMs (capped by the neuron count).
    block_d: dense rows per phase-1 step.  block_i: kept rows per phase-2 step.
    chunk: scores compacted at a time (and, with interleave, phase-1 rows between phase-2 steps).
    balance: (given vector) split the kept neurons, not the neurons, evenly over the programs.
    interleave: (computed vector) alternate phase 1 and phase 2 chunk by chunk.
    prefetch: phase 1 loads step k+1 while reducing step k.
    pipe: phase 2 loads step k+1 while reducing step k.
    finalize: 0 caller zeroes/casts (3 launches), 1 last program casts (memset + kernel),
              2 last program casts and re-zeroes a persistent per-device workspace (1 launch).
    ncopy: copies of the fp32 workspace the programs spread their atomic adds over.
    """

    programs_per_sm: int = 1
    block_d: int = 4
    block_i: int = 4
    chunk: int = 64
    num_warps: int = 8
    balance: bool = False
    interleave: bool = False
    prefetch: bool = False
    pipe: bool = False
    finalize: int = 2
    ncopy: int = 1


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
MAX_BALANCE_INTER = 32768  # the balanced split holds the whole score vector in registers

_INTERPRET_CONFIG = KernelConfig(programs_per_sm=3, block_d=4, block_i=4, chunk=16, num_warps=4)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(kind: int, compute: bool, hidden: int, inter: int, device: torch.device) -> KernelConfig:
    """The launch configuration used by the public ops for this path and shape."""
    if device.type != "cuda":
        return _INTERPRET_CONFIG
    cfg = _GPU_CONFIGS[(kind, compute)]
    if triton.next_power_of_2(hidden) >= 8192 and cfg.num_warps < 16:
        # keep the per-thread share of the H-wide accumulator and row tiles the same
        cfg = dataclasses.replace(cfg, num_warps=cfg.num_warps * 2)
    return cfg


# FINALIZE 2: one zero-on-exit workspace per (device, size). Kernels on one stream run one after
# another, so they can share it; ops must not run concurrently on two streams of one device.
_PERSISTENT_WS: dict[tuple[str, int | None, int], torch.Tensor] = {}


def _persistent_workspace(device: torch.device, size: int) -> torch.Tensor:
    key = (device.type, device.index, size)
    ws = _PERSISTENT_WS.get(key)
    if ws is None:
        ws = torch.zeros(size, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # first use inside a CUDA graph capture: the zero fill only runs when the graph replays, so
            # this buffer is the graph's own (filled before its kernel at every replay), not kept for others
            return ws
        _PERSISTENT_WS[key] = ws
    return ws


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
) -> torch.Tensor:
    """Run the kernel; arguments are assumed validated (see the public ops). Returns y [H].

    x [H] contiguous; vec [I] contiguous (ignored and replaced by fp32 scratch when ``compute``);
    w_gate, w_up, w_down_t [I, H] contiguous (a weight the path does not read may be None);
    threshold: 1-element tensor on x's device, or an [I] contiguous fp32 tensor of per-neuron
    thresholds (or None, then ``threshold_value`` is used). score_act / signed: the score (table above).
    config: launch parameters (default: ``pick_config``). out: optional [H] output buffer (tests
    poison it to check that every element is written; with finalize=0 it is filled by a copy).
    """
    inter, hidden = w_down_t.shape
    device = w_down_t.device
    cfg = config or pick_config(kind, compute, hidden, inter, device)
    thr_vec = is_threshold_vector(threshold)
    programs, npp, meta = _grid_and_meta(kind, compute, hidden, inter, act, score_act, threshold is not None,
                                         cfg, device, thr_vec=thr_vec, signed=signed)
    meta.update(pdl_meta(device))
    if compute:
        vec = torch.empty(inter, dtype=torch.float32, device=device)
    finalize, ncopy = meta["FINALIZE"], meta["NCOPY"]
    size = ncopy * hidden + 1  # fp32 copies of y, then the int32 ticket counter
    if finalize == 2:
        ws = _persistent_workspace(device, size)
    else:
        ws = torch.zeros(size, dtype=torch.int32, device=device)
    acc_ws = ws[: size - 1].view(torch.float32)
    counter = ws[size - 1:]
    if out is None:
        out = torch.empty(hidden, dtype=out_dtype, device=device)
    w_gate = w_down_t if w_gate is None else w_gate
    w_up = w_down_t if w_up is None else w_up
    _sparse_ffn_kernel[(programs,)](
        x, vec, w_gate, w_up, w_down_t, counter if threshold is None else threshold, acc_ws, counter, out,
        float(threshold_value), hidden, inter, npp, **meta,
    )
    if finalize == 0:
        return out.copy_(acc_ws.view(ncopy, hidden).sum(0))
    return out


def pdl_meta(device: torch.device) -> dict:
    """The launch arguments that turn programmatic dependent launch on for a kernel with a PDL
    constexpr (none when it is off, so the interpreter never sees them)."""
    return {"PDL": True, "launch_pdl": True} if pdl_launch(device) else {}


def is_threshold_vector(threshold: torch.Tensor | None) -> bool:
    """Whether a validated threshold tensor holds one threshold per neuron (else one for all). A
    1-element vector for I = 1 counts as a scalar: both mean the same."""
    return threshold is not None and threshold.numel() > 1


def _grid_and_meta(kind, compute, hidden, inter, act, score_act, thr_is_tensor, cfg, device, *, thr_vec=False,
                   signed=False):
    programs = max(1, min(cfg.programs_per_sm * _num_sms(device), triton.cdiv(inter, cfg.block_i)))
    npp = triton.cdiv(inter, programs)
    balance = cfg.balance and not compute and triton.next_power_of_2(inter) <= MAX_BALANCE_INTER
    if not balance:
        programs = triton.cdiv(inter, npp)
    meta = dict(
        KIND=kind, COMPUTE=compute, SCORE_ACT=score_act, SIGNED=signed or kind == KIND_SCORE,
        ACT=ACTIVATIONS.index(act), THR_PTR=thr_is_tensor and not thr_vec, THR_VEC=thr_vec,
        H_PAD=triton.next_power_of_2(hidden), I_PAD=triton.next_power_of_2(inter) if balance else 1,
        BLOCK_D=cfg.block_d, BLOCK_I=cfg.block_i, CHUNK=cfg.chunk, BALANCE=balance,
        INTERLEAVE=cfg.interleave and compute, PREFETCH=cfg.prefetch, FINALIZE=cfg.finalize,
        NCOPY=cfg.ncopy, PIPE=cfg.pipe, num_warps=cfg.num_warps, num_stages=1,
    )
    if deterministic() and programs > 1:
        # one workspace row per program (one add onto zero: exact), summed by the caller in row order
        meta.update(FINALIZE=0, NCOPY=programs)
    return programs, npp, meta


def compile_kernel(kind: int, compute: bool, dtype: torch.dtype, vec_dtype: torch.dtype, hidden: int, inter: int,
                   act: str = "silu", score_act: bool = False, thr_is_tensor: bool = False,
                   config: KernelConfig | None = None, device: torch.device | None = None, *,
                   thr_vec: bool = False, signed: bool = False) -> None:
    """Compile (without running) the kernel ``launch`` would use for these dtypes and shape.

    Useful before CUDA-graph capture and to compile many variants in parallel processes (the
    compiled kernel lands in Triton's on-disk cache). vec_dtype: dtype of the given vector (t, a
    or score; ignored when ``compute``). thr_vec: per-neuron fp32 thresholds (implies a tensor).
    Pointers are assumed 16-byte aligned, as allocations are.
    """
    device = device or torch.device("cuda", torch.cuda.current_device())
    cfg = config or pick_config(kind, compute, hidden, inter, device)
    thr_is_tensor = thr_is_tensor or thr_vec
    programs, npp, meta = _grid_and_meta(kind, compute, hidden, inter, act, score_act, thr_is_tensor, cfg, device,
                                         thr_vec=thr_vec, signed=signed)
    x_dtype = dtype
    _sparse_ffn_kernel.warmup(
        x_dtype, torch.float32 if compute else vec_dtype, dtype, dtype, dtype,
        torch.float32 if thr_is_tensor else torch.int32, torch.float32, torch.int32, dtype,
        0.0, hidden, inter, npp, grid=(programs,), **meta,
    )


def op_or_impl(op, impl):
    """The registered op under torch.compile (opaque to the compiler, with its fake kernel); the plain
    implementation when eager, which skips the custom-op dispatch (about 20 us a call on a CPU)."""
    return op if torch.compiler.is_compiling() else impl
