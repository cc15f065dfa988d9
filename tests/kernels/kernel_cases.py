"""Shared inputs and checks for the kernel tests (imported by the test modules of this folder)."""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

triton = pytest.importorskip("triton")

from countdown import kernels  # noqa: E402
from countdown.kernels import _core, reference  # noqa: E402, F401  (_core: re-exported to the tests)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SPARSITIES = (0.0, 0.5, 0.9, 0.99)

if not ON_GPU and not kernels.interpret_mode():
    raise RuntimeError(
        "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, and there "
        "is no GPU: the kernels cannot run. Set TRITON_INTERPRET=1 in the environment (or in "
        "tests/conftest.py) when no CUDA device is present.")

# (H, I): small and odd in the interpreter (H=72 is not a multiple of 16, H=40 not of 16 or a power
# of two); the real model shapes on a GPU (SmolLM2, Qwen2.5-14B, Qwen2-7B, Llama-3-8B).
if ON_GPU and os.environ.get("COUNTDOWN_KERNEL_TESTS", "full") == "full":
    SHAPES = [(576, 1536), (5120, 13824), (3584, 18944), (4096, 14336)]
else:
    SHAPES = [(72, 200), (40, 136)]
# the shape for tests that loop over many launch configurations
SMALL = SHAPES[0] if ON_GPU else SHAPES[1]


class FFNWeights(NamedTuple):
    """One gated FFN as the ops read it: W_gate, W_up [I, H] (nn.Linear's layout), W_down transposed [I, H]."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down_t: torch.Tensor

    @property
    def intermediate_size(self) -> int:
        return self.w_down_t.shape[0]


def layout(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> FFNWeights:
    """nn.Linear weights W_gate [I, H], W_up [I, H], W_down [H, I] in the ops' layout."""
    return FFNWeights(w_gate.contiguous(), w_up.contiguous(), w_down.t().contiguous())


def weights(hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    """Fresh random (non-zero) FFN weights in the ops' layout; x-scaled so activations are O(1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    wg = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wu = torch.randn(inter, hidden, generator=g) / hidden**0.5
    wd = torch.randn(hidden, inter, generator=g) / inter**0.5
    x = torch.randn(hidden, generator=g)
    to = dict(dtype=dtype, device=DEVICE)
    return x.to(**to), layout(wg.to(**to), wu.to(**to), wd.to(**to))


threshold_for = reference.midpoint_threshold  # kernel and reference cannot disagree at it


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert torch.isfinite(out).all(), "output has NaN/inf (an element was not written?)"
    ref32 = ref.double()
    return float((out.double() - ref32).norm() / ref32.norm().clamp_min(1e-30))


def tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]


def cases():
    """(hidden, inter, dtype, sparsity): on a GPU every shape x every sparsity in bf16, plus fp16 and
    fp32; in the interpreter every sparsity in bf16 on the first shape and fp16/fp32 on the second
    (keeps the CPU run short)."""
    out = []
    for n, (h, i) in enumerate(SHAPES):
        if ON_GPU or n == 0:
            out += [(h, i, torch.bfloat16, s) for s in SPARSITIES]
        if ON_GPU or n == 1:
            out += [(h, i, torch.float16, 0.5), (h, i, torch.float32, 0.9)]
    return out


def ids(cs):
    return [f"{h}x{i}-{str(d).split('.')[-1]}-s{s}" for h, i, d, s in cs]
