"""Weight layout for the sparse-FFN ops, and the argument checks shared by their entry points.

``pack_ffn_weights`` is run once, at sparsify time. It needs no Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class PackedFFN(NamedTuple):
    """Weights of one gated FFN, laid out for the kernels. All [I, H], row-major, one dtype.

    w_gate    W_gate as stored by nn.Linear (row i = neuron i's gate weights)
    w_up      W_up as stored by nn.Linear
    w_down_t  W_down transposed: row i = column i of W_down, the output direction of neuron i
    """

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down_t: torch.Tensor

    @property
    def hidden_size(self) -> int:
        return self.w_down_t.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w_down_t.shape[0]


def pack_ffn_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> PackedFFN:
    """Lay out nn.Linear weights W_gate [I, H], W_up [I, H], W_down [H, I] for the kernels.

    W_gate and W_up are kept (made contiguous if they are not); W_down is transposed once into a
    contiguous [I, H] copy. The dtype is kept (bf16, fp16 or fp32; all three must match).
    """
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    inter, hidden = w_gate.shape
    if tuple(w_up.shape) != (inter, hidden):
        raise ValueError(f"w_up must have w_gate's shape {(inter, hidden)} ([I, H]), got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (hidden, inter):
        raise ValueError(f"w_down must be [H, I] = {(hidden, inter)} (nn.Linear layout), got {tuple(w_down.shape)}")
    if not (w_gate.dtype == w_up.dtype == w_down.dtype):
        raise TypeError(f"weights must share one dtype, got {w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    if not (w_gate.device == w_up.device == w_down.device):
        raise ValueError(f"weights must be on one device, got {w_gate.device}, {w_up.device}, {w_down.device}")
    return PackedFFN(w_gate.contiguous(), w_up.contiguous(), w_down.t().contiguous())


# --------------------------------------------------------------------------------------------
# checks used by the ops' entry points


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
        raise ValueError(f"{name} must be contiguous row-major [I, H] (use pack_ffn_weights), "
                         f"got strides {w.stride()}")


def check_vector(name: str, v: torch.Tensor, length: int, device: torch.device,
                 allow_bool: bool = False) -> torch.Tensor:
    """A batch-1 vector of ``length`` entries ([L], [1, L] or [1, 1, L]); returns it as [L] contiguous."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    ok = SUPPORTED_DTYPES + ((torch.bool, torch.uint8) if allow_bool else ())
    if v.dtype not in ok:
        raise TypeError(f"{name} has dtype {v.dtype}; supported: {', '.join(map(str, ok))}")
    if v.shape[-1:] != (length,) or v.numel() != length:
        raise ValueError(f"{name} must hold one token ({length} values; shape [{length}], [1, {length}] "
                         f"or [1, 1, {length}]), got shape {tuple(v.shape)}; batch > 1 and prefill "
                         f"use the reference path")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device}, expected {device}")
    return v.reshape(length).contiguous()


def check_threshold(threshold, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """(tensor, 0.0) for a 1-element tensor threshold, (None, value) for a Python number."""
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold tensor must hold one value, got shape {tuple(threshold.shape)}")
        if not threshold.is_floating_point():
            raise TypeError(f"threshold tensor must be floating point, got {threshold.dtype}")
        if threshold.device != device:
            raise ValueError(f"threshold is on {threshold.device}, expected {device}")
        return threshold.reshape(1), 0.0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float or a 1-element tensor, got {type(threshold).__name__}")
    return None, float(threshold)


def check_act(act: str) -> None:
    if act not in ("silu", "gelu_tanh", "gelu", "relu"):
        raise ValueError(f"unknown activation {act!r}; expected 'silu', 'gelu_tanh', 'gelu' or 'relu'")


def check_input(x: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.dtype, torch.device]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: bfloat16, float16, float32")
    xv = check_vector("x", x, hidden, x.device)
    return xv, x.dtype, x.device


def check_gated_call(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                     act: str) -> tuple[torch.Tensor, int, int, torch.device]:
    """Validate a call that reads all three gated-FFN matrices; returns (x as [H], I, H, device)."""
    from . import _core  # _core imports triton, which this module must not need

    if not isinstance(w_down_t, torch.Tensor) or w_down_t.dim() != 2:
        raise ValueError("w_down_t must be a 2-D tensor [I, H] (W_down transposed, see pack_ffn_weights)")
    inter, hidden = w_down_t.shape
    xv, dtype, device = check_input(x, hidden)
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down_t", w_down_t)):
        check_weight(name, w, (inter, hidden), dtype, device)
    check_act(act)
    _core.check_kernel_target(device, hidden, inter)
    return xv, inter, hidden, device
