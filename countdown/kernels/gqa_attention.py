"""One-token grouped-query attention over a KV cache (split over the cache, flash-decoding style).

    decode_attention(q, k, v, mask, scale)      out = softmax(q kᵀ · scale + mask) v, per key/value head

Shapes and layouts (B decode rows, H key/value heads, G query heads per key/value head, L cache slots,
D head dim):
    q     [B, H, G, D]  the one query token's heads, grouped by the key/value head they read (query head
                        h·G + r is row r of head h, as transformers' ``repeat_kv`` pairs them); any
                        strides, D contiguous
    k, v  [B, H, L, D]  the cache as it is (a static cache: slots past the filled length are masked);
                        any strides, D contiguous; q's dtype (bf16, fp16, fp32)
    mask  [B or 1, 1, 1, L] bool (True: attend) or float (added to the scores, transformers' additive
                        masks), any strides; or None (every slot)
    out   [B, H, G, D]  contiguous, q's dtype
    scale               the score scale (None: 1 / sqrt(D))

Same result as ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)``
(``reference.decode_attention``). Why a kernel: at one token a step, cuDNN's attention spends ~9 µs a
layer on the Llama-3-8B shape reading a 1 MB cache (docs/BENCHMARKS.md, session 10), latency rather than
bytes. Here every (row, key/value head) pair is split over the cache into programs of ``SLOTS_PER_SPLIT``
or more slots; each keeps an online softmax over its slots in fp32 (scores with ``tl.dot`` over the G rows
padded to 16), and the last program of a pair to finish (atomic ticket) combines the partial results.
On caches of ``SKIP_HIDDEN_FROM`` slots or more, slots the mask hides are never loaded, so a long static
cache costs what its filled part costs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime
from .pack import SUPPORTED_DTYPES, interpret_mode

__all__ = ["decode_attention", "decode_attention_unavailable_reason"]

BLOCK_L = 64  # cache slots per loop step
SLOTS_PER_SPLIT = 64  # at least this many slots per program
PROGRAMS_PER_SM = 2
MAX_GROUP = 64
MAX_HEAD_DIM = 256
LOG2E = tl.constexpr(1.4426950408889634)  # a constant the kernel may read
INTERPRETER_SMS = 4  # off the GPU: enough "SMs" that the tests' short caches still split
# From this many cache slots on, the K/V loads wait for the mask so that hidden slots (the unfilled part of a
# static cache) are not read: bytes saved on long caches; on short ones, loading K, V and the mask at once
# saves a dependent load's latency instead
SKIP_HIDDEN_FROM = 1024


@triton.jit
def _decode_attention_kernel(
    q_ptr,      # [B, H, G, D] (strides sqb, sqh, sqg; D contiguous)
    k_ptr,      # [B, H, L, D] (strides skb, skh, skl; D contiguous)
    v_ptr,      # [B, H, L, D] (strides svb, svh, svl; D contiguous)
    mask_ptr,   # [B or 1, L] bool (as uint8) or float (strides smb, sml); unused when MASK == 0
    out_ptr,    # [B, H, G, D] contiguous, q's dtype
    part_ptr,   # [B * H * splits, G_PAD, D_PAD] fp32 partial outputs (unnormalized)
    stat_ptr,   # [B * H * splits, 2, G_PAD] fp32 running max (log2 units) and sum of each partial
    cnt_ptr,    # [>= B * H] int32 tickets, zero on entry and on exit
    sqb, sqh, sqg, skb, skh, skl, svb, svh, svl, smb, sml,
    H, G, L, D, SPS, SPLITS, scale_log2,  # SPS: slots per split; scale_log2 = scale · log2(e)
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS_PAD: tl.constexpr,
    MASK: tl.constexpr,  # 0 none, 1 bool, 2 additive
    SKIP_HIDDEN: tl.constexpr,  # K/V loads wait for the mask and skip hidden slots (long caches)
    F32: tl.constexpr,   # dot in fp32 (fp32 inputs, or the interpreter)
):
    pair = tl.program_id(0)  # b * H + h
    split = tl.program_id(1)
    b = pair // H
    h = pair % H
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    gm = g < G
    dm = d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    lo = split * SPS
    hi = tl.minimum(lo + SPS, L)
    for s0 in tl.range(lo, hi, BLOCK_L):
        s = s0 + tl.arange(0, BLOCK_L)
        in_range = s < hi
        visible = in_range
        if MASK == 1:
            visible = visible & (tl.load(mask_ptr + b * smb + s * sml, mask=visible, other=0) != 0)
        if MASK == 2:
            bias = tl.load(mask_ptr + b * smb + s * sml, mask=visible, other=float("-inf")).to(tl.float32)
            visible = visible & (bias > float("-inf"))
        if SKIP_HIDDEN:
            kv_mask = visible[:, None] & dm[None, :]
        else:
            kv_mask = in_range[:, None] & dm[None, :]
        kt = tl.load(k_ptr + b * skb + h * skh + s[:, None] * skl + d[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(v_ptr + b * svb + h * svh + s[:, None] * svl + d[None, :], mask=kv_mask, other=0.0)
        vt = tl.where(visible[:, None], vt, tl.zeros_like(vt))  # a hidden slot's value never counts, not even NaN
        if F32:
            scores = tl.dot(q, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(kt))
        scores = scores * scale_log2  # [G_PAD, BLOCK_L], log2 units
        if MASK == 2:
            scores = scores + bias[None, :] * LOG2E
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_offs = out_ptr + pair * G * D + g[:, None] * D + d[None, :]
    out_mask = gm[:, None] & dm[None, :]
    if SPLITS == 1:
        tl.store(out_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        slot = pair * SPLITS + split
        tl.store(part_ptr + slot * G_PAD * D_PAD + g[:, None] * D_PAD + d[None, :], acc)
        tl.store(stat_ptr + slot * 2 * G_PAD + g, m_i)
        tl.store(stat_ptr + slot * 2 * G_PAD + G_PAD + g, l_i)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them
        ticket = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel")
        if ticket == SPLITS - 1:  # the last split of this pair combines all of them
            sp = tl.arange(0, SPLITS_PAD)
            spm = sp < SPLITS
            stats = stat_ptr + (pair * SPLITS + sp)[:, None] * 2 * G_PAD + g[None, :]
            ms = tl.load(stats, mask=spm[:, None], other=float("-inf"), cache_modifier=".cg")  # [SPLITS_PAD, G_PAD]
            ls = tl.load(stats + G_PAD, mask=spm[:, None], other=0.0, cache_modifier=".cg")
            m_all = tl.max(ms, axis=0)
            m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
            total = tl.sum(ls * tl.exp2(ms - m_all[None, :]), axis=0)  # [G_PAD]
            res = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
            for i in range(0, SPLITS):
                w = tl.exp2(tl.load(stat_ptr + (pair * SPLITS + i) * 2 * G_PAD + g, cache_modifier=".cg") - m_all)
                part = tl.load(part_ptr + (pair * SPLITS + i) * G_PAD * D_PAD + g[:, None] * D_PAD + d[None, :],
                               cache_modifier=".cg")
                res += part * w[:, None]
            tl.store(out_offs, (res / total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + pair, 0)  # zero again for the next call (and the next graph replay)


def _splits(pairs: int, length: int, device: torch.device, slots_per_split: int) -> int:
    """Programs per (row, head) pair: enough to fill the GPU, each with at least ``slots_per_split`` slots."""
    sms = _runtime.num_sms(device) if device.type == "cuda" else INTERPRETER_SMS
    return max(1, min(triton.cdiv(length, slots_per_split), triton.cdiv(PROGRAMS_PER_SM * sms, pairs)))


def _tickets(device: torch.device, pairs: int) -> torch.Tensor:
    """A zero-on-exit int32 ticket per (row, head) pair (shared with the other kernels' workspaces of this
    size: kernels on one stream run one after another, and each leaves it zero)."""
    return _runtime.persistent_workspace(device, max(1024, triton.next_power_of_2(pairs)))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float, *,
           slots_per_split: int = SLOTS_PER_SPLIT, skip_hidden_from: int = SKIP_HIDDEN_FROM) -> torch.Tensor:
    """Run the kernel on validated arguments (shapes in the module docstring); returns out [B, H, G, D].
    slots_per_split: the fewest cache slots a program takes; skip_hidden_from: the cache length from which
    the K/V loads wait for the mask (defaults: the tuned module constants; benches pass others)."""
    batch, heads, group, dim = q.shape
    length = k.shape[2]
    out = torch.empty(batch, heads, group, dim, dtype=q.dtype, device=q.device)
    pairs = batch * heads
    splits = _splits(pairs, length, q.device, slots_per_split)
    sps = triton.cdiv(triton.cdiv(length, splits), BLOCK_L) * BLOCK_L
    splits = triton.cdiv(length, sps)
    g_pad, d_pad = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(dim))
    part = torch.empty(pairs * splits * g_pad * d_pad if splits > 1 else 1, dtype=torch.float32, device=q.device)
    stat = torch.empty(pairs * splits * 2 * g_pad if splits > 1 else 1, dtype=torch.float32, device=q.device)
    if mask is None:
        kind, m2, smb, sml = 0, q, 0, 0
    else:
        kind = 1 if mask.dtype == torch.bool else 2
        m2 = mask.view(mask.shape[0], mask.shape[-1])
        m2 = m2.view(torch.uint8) if kind == 1 else m2
        smb, sml = (m2.stride(0) if m2.shape[0] > 1 else 0), m2.stride(1)
    _decode_attention_kernel[(pairs, splits)](
        q, k, v, m2, out, part, stat, _tickets(q.device, pairs),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), smb, sml,
        heads, group, length, dim, sps, splits, float(scale) * LOG2E.value,
        G_PAD=g_pad, D_PAD=d_pad, BLOCK_L=BLOCK_L, SPLITS_PAD=triton.next_power_of_2(splits), MASK=kind,
        SKIP_HIDDEN=kind != 0 and length >= skip_hidden_from,
        F32=q.dtype == torch.float32 or q.device.type != "cuda", num_warps=4,
    )
    return out


def _impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          scale: float) -> torch.Tensor:
    return launch(q, k, v, mask, scale)


_op = torch.library.custom_op("countdown::decode_attention", _impl, mutates_args=())


@_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], q.shape[3])


def decode_attention_unavailable_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                        mask: Optional[torch.Tensor]) -> str | None:
    """None when ``decode_attention`` serves these tensors, else why not (then use SDPA, or
    ``reference.decode_attention``, on the same arguments)."""
    if q.device.type != "cuda" and not interpret_mode():
        return f"tensors are on {q.device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D, got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    batch, heads, group, dim = q.shape
    if k.shape[:2] != (batch, heads) or k.shape[3] != dim or v.shape != k.shape:
        return (f"k and v must be [B, H, L, {dim}] with B, H of q {tuple(q.shape)}, "
                f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype} not supported (bf16, fp16, fp32, matching)"
    if group > MAX_GROUP or dim > MAX_HEAD_DIM or k.shape[2] == 0:
        return (f"{group} query heads per key/value head (max {MAX_GROUP}), head dim {dim} "
                f"(max {MAX_HEAD_DIM}), {k.shape[2]} slots (at least 1)")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return "the head dim of q, k and v must be contiguous"
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, batch) \
                or mask.shape[3] != k.shape[2]:
            return f"mask must be [B or 1, 1, 1, {k.shape[2]}], got {tuple(mask.shape)}"
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            return f"mask must be bool or float, got {mask.dtype}"
    return None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v for one query token a row (shapes in the module docstring).
    Raises ValueError when the kernel cannot serve the arguments (``decode_attention_unavailable_reason``)."""
    reason = decode_attention_unavailable_reason(q, k, v, mask)
    if reason is not None:
        raise ValueError(f"decode_attention: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _runtime.op_or_impl(_op, _impl)(q, k, v, mask, scale)
