"""Input sparsity of the attention projections (TEAL's attention part), composable with any FFN method.

A projection skips the input channels whose magnitude is at or below a per-layer threshold: q, k and v
share one input and one threshold (site "qkv"), o_proj has its own (site "o"). Thresholds are the
pooled quantiles of |input| on calibration text (`countdown.calibrate`, in the same pass as the FFN's).

The model's own ``nn.Linear`` modules stay in place: their class is switched to `SparseInputLinear`,
so parameters, ``state_dict`` keys and hooks are untouched, and `remove` switches them back. A decode
step (1 to 16 tokens) on CUDA runs through the input-sparse GEMV
(`countdown.kernels.input_sparse_linear`), which reads only the weight rows of kept channels; for it
the weight is stored input-major (one copy: ``weight`` is a transposed view of contiguous [in, out]
rows). Everything else takes the reference path: mask the input, then ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .ffn import (KERNEL_MODES, SparsityMeter, SparsitySpec, dense_positions, is_input_major,
                  relayout_allowed, use_input_major)
from .models import ATTENTION_SITES as SITES
from .models import AttentionSite, attention_sites


class SparseInputLinear(nn.Linear):
    """An nn.Linear that skips input channels with ``|x| <= threshold`` (set up by `install`)."""

    sparse_threshold: torch.Tensor  # [1] float32 buffer
    spec: SparsitySpec
    site: str
    layer_idx: int
    sparse_from: int | None
    kernels: str
    meter: SparsityMeter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, in]; a projection acts per position, so splitting along T is exact
        n = x.shape[-2] if x.dim() > 1 else 1
        n_dense = dense_positions(self.spec, self.sparse_from, n)
        if n_dense == 0:
            return self._sparse(x)
        dense = F.linear(x[..., :n_dense, :], self.weight, self.bias)
        if n_dense == n:
            return dense
        return torch.cat([dense, self._sparse(x[..., n_dense:, :])], dim=-2)

    def kernel_skip_reason(self, x: torch.Tensor) -> str | None:
        """None when ``x`` can run through the input-sparse GEMV, else why not."""
        if self.kernels == "off":
            return "kernels are switched off"
        if self.meter is not None:
            return "measured-sparsity tracking is on (evaluation counts every mask on the reference path)"
        if self.kernels == "auto" and x.device.type != "cuda":
            return f"input is on {x.device.type}; kernels='auto' uses them on CUDA only"
        if not is_input_major(self):
            if not relayout_allowed(x):
                return "the weight is not input-major; call countdown.set_kernels(model) before capture"
            use_input_major(self, True)  # first eager call after the model moved to the GPU
        return kernels.input_sparse_unavailable_reason(x, self.weight.t())

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_skip_reason(x) is None:
            y = kernels.input_sparse_linear(x, self.weight.t(), self.sparse_threshold)
            return y if self.bias is None else y + self.bias
        keep = (x.abs() > self.sparse_threshold.to(x.dtype)).to(x.dtype)
        if self.meter is not None:
            self.meter.add(self.site, keep)
        return F.linear(x * keep, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input sparsity site={self.site}, sparsity={self.spec.attention}"


def _projections(site: AttentionSite) -> list[tuple[nn.Linear, str]]:
    return [(p, "qkv") for p in site.qkv] + [(site.o, "o")]


def check_supported(model: nn.Module) -> list[AttentionSite]:
    """The attention sites, or a clear error when the model's projections are not plain nn.Linear."""
    sites = attention_sites(model)
    for site in sites:
        for projection, _ in _projections(site):
            if type(projection) not in (nn.Linear, SparseInputLinear):
                raise TypeError(f"layer {site.layer}: attention projection is a {type(projection).__name__}, "
                                "attention sparsity needs plain nn.Linear projections")
    return sites


def install(model: nn.Module, spec: SparsitySpec, thresholds: torch.Tensor) -> None:
    """Make every attention projection input-sparse; ``thresholds`` [L, 2] for the sites ("qkv", "o")."""
    for site in check_supported(model):
        for projection, name in _projections(site):
            projection.__class__ = SparseInputLinear
            thr = thresholds[site.layer, SITES.index(name)].reshape(1).float().clone()
            projection.register_buffer("sparse_threshold", thr.to(projection.weight.device), persistent=False)
            projection.spec, projection.site, projection.layer_idx = spec, name, site.layer
            projection.sparse_from, projection.kernels, projection.meter = None, "auto", None


def sparse_projections(model: nn.Module) -> list[SparseInputLinear]:
    return [m for m in model.modules() if isinstance(m, SparseInputLinear)]


def thresholds_of(model: nn.Module) -> torch.Tensor | None:
    """[L, 2] thresholds of the installed input sparsity (None when there is none)."""
    projections = sparse_projections(model)
    if not projections:
        return None
    n_layers = 1 + max(p.layer_idx for p in projections)
    out = torch.zeros(n_layers, len(SITES))
    for p in projections:
        out[p.layer_idx, SITES.index(p.site)] = p.sparse_threshold.float().cpu()
    return out


def remove(model: nn.Module) -> None:
    """Dense attention projections again, in nn.Linear's own layout."""
    for p in sparse_projections(model):
        use_input_major(p, False)
        del p.sparse_threshold
        for name in ("spec", "site", "layer_idx", "sparse_from", "kernels", "meter"):
            p.__dict__.pop(name, None)
        p.__class__ = nn.Linear


def set_kernels(model: nn.Module, mode: str = "auto") -> int:
    """As `countdown.ffn.set_kernels`, for the input-sparse attention projections."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {mode!r}")
    projections = sparse_projections(model)
    for p in projections:
        p.kernels = mode
        use_input_major(p, mode == "always" or (mode == "auto" and p.weight.is_cuda))
    return len(projections)
