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

With ``kernels.input_sparse.FUSE_QKV`` (on by default; 24-37% faster than three launches on the H100) q, k
and v run as one launch (`countdown.kernels.input_sparse_prefetch.input_sparse_multi`): the first of
them called with a decode input computes all three and leaves the other two results on their modules,
which return them when called with the same, unmodified input tensor. Inside a CUDA graph capture the
one launch is recorded and the other two calls record nothing; under torch.compile it stays off.
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


def _fuse_qkv_on() -> bool:
    """``kernels.input_sparse.FUSE_QKV`` (that module exists only where Triton is installed)."""
    module = getattr(kernels, "input_sparse", None)
    return module is not None and module.FUSE_QKV


class SparseInputLinear(nn.Linear):
    """An nn.Linear that skips input channels with ``|x| <= threshold`` (set up by `install`)."""

    sparse_threshold: torch.Tensor  # [1] float32 buffer
    spec: SparsitySpec
    site: str
    layer_idx: int
    sparse_from: int | None
    kernels: str
    meter: SparsityMeter | None
    qkv_group: list[SparseInputLinear] | None  # q, k, v of this layer (FUSE_QKV), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, in]; a projection acts per position, so splitting along T is exact
        n = x.shape[-2] if x.dim() > 1 else 1
        n_dense = dense_positions(self.spec, self.sparse_from, n)
        if n_dense == 0:
            return self._sparse(x, fuse=True)
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

    def _sparse(self, x: torch.Tensor, fuse: bool = False) -> torch.Tensor:
        if self.kernel_skip_reason(x) is None:
            y = self._fused_qkv(x) if fuse and _fuse_qkv_on() else None
            if y is None:
                y = kernels.input_sparse_linear(x, self.weight.t(), self.sparse_threshold)
            return y if self.bias is None else y + self.bias
        keep = (x.abs() > self.sparse_threshold.to(x.dtype)).to(x.dtype)
        if self.meter is not None:
            self.meter.add(self.site, keep)
        return F.linear(x * keep, self.weight, self.bias)

    def _fused_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """This projection's output (no bias) from one launch for q, k and v, or None to run alone.

        ``x`` is the whole forward input (the same tensor object the model passes to q, k and v), so a
        result left by a sibling is valid when it was computed from this very tensor at its current
        version (no in-place change since)."""
        group = getattr(self, "qkv_group", None)
        if group is None or torch.compiler.is_compiling():
            return None
        left = self.__dict__.pop("_qkv_result", None)
        if left is not None and left[0] is x and left[1] == x._version:
            return left[2]
        if any(p.kernel_skip_reason(x) is not None for p in group if p is not self):
            return None
        from .kernels import input_sparse_prefetch

        ys = input_sparse_prefetch.input_sparse_multi(x, [p.weight.t() for p in group],
                                                      [p.sparse_threshold for p in group])
        for p, y in zip(group, ys):
            if p is not self:
                p.__dict__["_qkv_result"] = (x, x._version, y)
        return ys[group.index(self)]

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
            projection.qkv_group = site.qkv if name == "qkv" and len(site.qkv) > 1 else None


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
        for name in ("spec", "site", "layer_idx", "sparse_from", "kernels", "meter", "qkv_group", "_qkv_result"):
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
