"""Which arguments the input-sparse GEMV kernels serve (the walk and the prefetch kernel share them)."""

from __future__ import annotations

import torch
import triton

from .pack import MAX_BATCH, SUPPORTED_DTYPES, interpret_mode


def problem(x, w_t, channel_scale) -> tuple[type[Exception], str] | None:
    """(exception type, reason) when the kernel cannot serve these arguments, else None."""
    if not isinstance(x, torch.Tensor) or not isinstance(w_t, torch.Tensor):
        return TypeError, "x and w_t must be torch.Tensors"
    if x.dtype not in SUPPORTED_DTYPES or w_t.dtype != x.dtype:
        return TypeError, f"dtypes x {x.dtype} / w_t {w_t.dtype} not supported (bf16, fp16 or fp32, matching)"
    if x.device.type != "cuda" and not interpret_mode():
        return ValueError, f"tensors are on {x.device.type}, the kernel needs CUDA (or TRITON_INTERPRET=1)"
    if w_t.dim() != 2:
        return ValueError, f"w_t must be 2-D [K, N] (W transposed), got shape {tuple(w_t.shape)}"
    k, n = w_t.shape
    if n == 0 or k == 0:
        return ValueError, f"empty weight {tuple(w_t.shape)}"
    if x.dim() == 0 or x.shape[-1] != k:
        return ValueError, f"x has shape {tuple(x.shape)}; its last dimension must be w_t's K = {k}"
    batch = x.numel() // k
    if not 1 <= batch <= MAX_BATCH:
        return ValueError, f"x holds {batch} tokens; the kernel serves 1 to {MAX_BATCH} (decode)"
    if w_t.device != x.device:
        return ValueError, f"w_t is on {w_t.device}, x on {x.device}"
    if not w_t.is_contiguous():
        return ValueError, (f"w_t must be contiguous [K, N] (W.t().contiguous(): one row per input channel), "
                            f"got strides {w_t.stride()}")
    if MAX_BATCH * n + triton.cdiv(n, 16) >= 2**31 or batch * k >= 2**31:
        return ValueError, "N or B*K too large for int32 indexing of the workspace / input"
    if channel_scale is not None:
        if not isinstance(channel_scale, torch.Tensor) or channel_scale.dtype != torch.float32:
            return TypeError, "channel_scale must be a float32 tensor"
        if channel_scale.dim() != 1 or channel_scale.numel() != k:
            return ValueError, f"channel_scale must have shape [{k}], got {tuple(channel_scale.shape)}"
        if channel_scale.device != x.device:
            return ValueError, f"channel_scale is on {channel_scale.device}, x on {x.device}"
        if not channel_scale.is_contiguous():
            return ValueError, "channel_scale must be contiguous"
    return None
