"""The argument checks shared by the sparse-FFN ops' entry points, and where the kernels apply.

The ops read W_gate, W_up [I, H] as nn.Linear stores them and W_down transposed, ``w_down_t`` [I, H]
(`countdown.ffn.use_input_major` keeps a sparse FFN's W_down that way), so a skipped neuron is a skipped
row. Nothing here needs Triton: the reference path and ``kernel_unavailable_reason`` (the one place
that says where the kernels apply) work without it.
"""

from __future__ import annotations

import os
import torch

from ..options import MAX_BATCH  # decode tokens per call (the batched kernels pad the batch to 16)

try:  # optional: CPU-only installs keep the reference path
    import triton

    HAS_TRITON = True
    _INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else (
        os.environ.get("TRITON_INTERPRET", "0") == "1")
except ImportError:
    HAS_TRITON, _INTERPRET = False, False

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")  # the kernels' activation codes are indices here
MAX_HIDDEN = 16384  # the batch-1 kernel keeps an output row [H] in registers


# --------------------------------------------------------------------------------------------
# where the kernels apply, and the checks used by the ops' entry points


def decode_batch(shape: torch.Size | tuple[int, ...]) -> tuple[int, str | None]:
    """(B, None) for tokens laid out [F], [B, F] or [B, 1, ..., 1, F] (B <= MAX_BATCH), else (B, reason)."""
    lead = tuple(shape[:-1])
    batch = lead[0] if lead else 1
    per_seq = 1
    for n in lead[1:]:
        per_seq *= n
    if per_seq != 1:
        return batch, (f"prefill: shape {tuple(shape)} holds {per_seq} tokens per sequence; the kernels serve "
                       f"decode (one token per sequence)")
    if batch > MAX_BATCH:
        return batch, f"batch B = {batch} > {MAX_BATCH} tokens"
    if batch < 1:
        return batch, "empty batch"
    return batch, None


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 when triton was first
    imported: Triton fixes the mode then, so it is read once; a constant keeps callers traceable)."""
    return _INTERPRET


def kernel_unavailable_reason(x: torch.Tensor, w_down_t: torch.Tensor, *, coefficients: bool = False) -> str | None:
    """None when the Triton kernels can serve these tokens with these weights, else the reason.

    x: the tokens [..., H] in the weights' dtype (with ``coefficients``: sparse_down's t [..., I],
    any float dtype). w_down_t: [I, H] (only its shape, dtype and device are looked at, so W_down.t()
    will do). The kernels serve decode batches of 1 to MAX_BATCH tokens ([H], [B, H], [B, 1, H]).
    """
    if not HAS_TRITON:
        return "Triton is not installed (pip install 'countdown-llm[gpu]')"
    if x.device.type != "cuda" and not interpret_mode():
        return (f"tensors are on {x.device.type}, the kernels need CUDA (or TRITON_INTERPRET=1 to run them "
                f"slowly on the CPU)")
    if w_down_t.dim() != 2:
        return f"w_down_t must be 2-D [I, H], got shape {tuple(w_down_t.shape)}"
    inter, hidden = w_down_t.shape
    if w_down_t.dtype not in SUPPORTED_DTYPES or not (coefficients or x.dtype == w_down_t.dtype):
        return f"dtype {x.dtype} / weights {w_down_t.dtype} not supported (bf16, fp16, fp32, matching)"
    width = inter if coefficients else hidden
    if x.dim() == 0 or x.shape[-1] != width:
        return f"input of shape {tuple(x.shape)} does not end in {width} ({'I' if coefficients else 'H'})"
    _, reason = decode_batch(x.shape)
    if reason:
        return reason
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN} (the batch-1 kernel holds an output row in registers)"
    if hidden * inter >= 2**31:
        return f"weights of {inter}x{hidden} elements exceed int32 indexing"
    return None


def require_kernel(x: torch.Tensor, w_down_t: torch.Tensor, *, coefficients: bool = False) -> None:
    """Raise ValueError with ``kernel_unavailable_reason``'s reason when it is not None."""
    reason = kernel_unavailable_reason(x, w_down_t, coefficients=coefficients)
    if reason is not None:
        raise ValueError(f"{reason}; use countdown.kernels.reference")


def check_weight(name: str, w: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype != dtype:
        raise TypeError(f"{name} has dtype {w.dtype}, expected {dtype} (the dtype of x / the weights)")
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape [I, H] = {shape}, got {tuple(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device}, expected {device}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous row-major [I, H] (W.t().contiguous() for W_down), "
                         f"got strides {w.stride()}")


def check_vector(name: str, v: torch.Tensor, length: int, device: torch.device, batch: int,
                 allow_bool: bool = False) -> torch.Tensor:
    """``batch`` tokens' vectors of ``length`` entries ([L] for one token, [B, L], [B, 1, L]); returns
    them as [B, L] contiguous."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    ok = SUPPORTED_DTYPES + ((torch.bool, torch.uint8) if allow_bool else ())
    if v.dtype not in ok:
        raise TypeError(f"{name} has dtype {v.dtype}; supported: {', '.join(map(str, ok))}")
    if v.dim() == 0 or v.shape[-1] != length:
        raise ValueError(f"{name} must have {length} values per token (shape [B, {length}]), got shape "
                         f"{tuple(v.shape)}")
    got, reason = decode_batch(v.shape)
    if reason:
        raise ValueError(f"{name}: {reason}; use countdown.kernels.reference")
    if got != batch:
        raise ValueError(f"{name} holds {got} token(s) (shape {tuple(v.shape)}) but the input holds {batch}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, expected {device}")
    return v.reshape(batch, length).contiguous()


def check_threshold(threshold, device: torch.device, per_neuron: int | None = None) -> tuple[torch.Tensor | None, float]:
    """(tensor, 0.0) for a 1-element tensor threshold, (None, value) for a Python number.

    ``per_neuron``: the op also takes one threshold per neuron, an [I] contiguous float32 tensor with
    I = per_neuron (returned as it is; ``_core.is_threshold_vector`` tells the launchers)."""
    if isinstance(threshold, torch.Tensor):
        if not threshold.is_floating_point():
            raise TypeError(f"threshold tensor must be floating point, got {threshold.dtype}")
        if threshold.device != device:
            raise ValueError(f"threshold is on {threshold.device}, expected {device}")
        if threshold.numel() == 1:
            return threshold.reshape(1), 0.0
        if per_neuron is None:
            raise ValueError(f"threshold tensor must hold one value, got shape {tuple(threshold.shape)}")
        if threshold.dim() != 1 or threshold.numel() != per_neuron:
            raise ValueError(f"threshold tensor must hold one value or one per neuron (shape [{per_neuron}]), "
                             f"got shape {tuple(threshold.shape)}")
        if threshold.dtype != torch.float32 or not threshold.is_contiguous():
            raise ValueError(f"per-neuron thresholds must be a contiguous float32 tensor [{per_neuron}], got "
                             f"{threshold.dtype} with strides {threshold.stride()}")
        return threshold, 0.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a 1-element tensor, got {type(threshold).__name__}")
    return None, float(threshold)


def check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")


def check_gather_mode(dense: str, score_act: bool | None) -> bool:
    """The gather ops' ``score_act`` resolved (default: the activation applies when the gate is the dense
    projection), after checking ``dense`` ("gate" | "up") and that an activated score has a gate to act on."""
    if dense not in ("gate", "up"):
        raise ValueError(f"dense must be 'gate' or 'up', got {dense!r}")
    if score_act is None:
        score_act = dense == "gate"
    if score_act and dense != "gate":
        raise ValueError("score_act=True needs dense='gate' (the activation applies to the gate)")
    return bool(score_act)


def check_input(x: torch.Tensor, w_down_t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tokens x ([H], [B, H] or [B, 1, H]) as [B, H] contiguous, and B; raises when the kernels
    cannot serve them (see ``kernel_unavailable_reason``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: bfloat16, float16, float32")
    if x.dtype != w_down_t.dtype:
        raise TypeError(f"x has dtype {x.dtype}, the weights {w_down_t.dtype}: they must match")
    require_kernel(x, w_down_t)
    batch, _ = decode_batch(x.shape)
    return x.reshape(batch, w_down_t.shape[1]).contiguous(), batch


def check_down(w_down_t: torch.Tensor) -> tuple[int, int]:
    if not isinstance(w_down_t, torch.Tensor) or w_down_t.dim() != 2:
        raise ValueError("w_down_t must be a 2-D tensor [I, H] (W_down transposed)")
    return w_down_t.shape


def check_gated_call(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                     act: str) -> tuple[torch.Tensor, int, int]:
    """Validate a call that reads all three gated-FFN matrices; returns (x as [B, H], B, I)."""
    inter, hidden = check_down(w_down_t)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        check_weight(name, w, (inter, hidden), w_down_t.dtype, w_down_t.device)
    check_act(act)
    xv, batch = check_input(x, w_down_t)
    return xv, batch, inter
