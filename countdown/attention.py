"""Input sparsity of the attention projections (TEAL's attention part), composable with any FFN method.

A projection skips the input channels whose magnitude is at or below a per-layer threshold: q, k and v
share one input and one threshold (site "qkv"), o_proj has its own (site "o"). Thresholds are the
pooled quantiles of |input| on calibration text (`countdown.calibrate`, in the same pass as the FFN's).

The model's own ``nn.Linear`` modules stay in place: their class is switched to `SparseInputLinear`,
so parameters, ``state_dict`` keys and hooks are untouched, and `remove` switches them back. A decode
step (1 to 16 tokens) on CUDA runs through the input-sparse GEMV
(`countdown.kernels.input_sparse_linear`; on a CPU its C++ twin in `countdown.kernels.cpu`), which
reads only the weight rows of kept channels; for it
the weight is stored input-major (one copy: ``weight`` is a transposed view of contiguous [in, out]
rows). Everything else takes the reference path: mask the input, then ``F.linear``.

q, k and v in one launch (`countdown.kernels.input_sparse_prefetch.input_sparse_multi`, 24-37% faster
than three on the H100), for input-sparse projections (with `countdown.KernelPolicy.fuse_qkv`, on by
default) and, opt-in, for dense ones (`fuse_qkv`: the kernel with a threshold that keeps every non-zero
channel). The layer's attention module gets a subclass of its own class (`QKVFusedAttention`) whose
forward, for a decode-sized input the kernel serves, computes the three outputs with one call on
``hidden_states``, hands each to its projection (``_qkv_given``: the input tensor and the output), runs
the model's own attention forward unchanged, and clears the hand-off. A projection returns the output
it was handed only when called with that very input tensor, so a model that feeds q/k/v something else
still gets correct results. The call is a registered op (``countdown::input_sparse_multi``), so the
decode step traces under torch.compile without a graph break, and a CUDA graph records one launch.
Prefill (more than 16 tokens), tokens the kernels do not serve, and positions the position policy keeps
dense take the model's own path; `QKVFusedAttention.qkv_skip_reason` says why for a given input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_route, kernels, parallel
from .ffn import SparsityMeter, is_input_major, relayout_allowed, use_input_major
from .options import MAX_BATCH, KernelPolicy
from .models import ATTENTION_SITES as SITES
from .models import AttentionSite, attention_sites
from .spec import SparsitySpec, dense_positions

QKV_NAMES = ("q_proj", "k_proj", "v_proj")
# A dense projection through the input-sparse kernel keeps channels with |x| > 0: a zero channel adds
# exactly 0 * w = 0 for finite weights, so nothing the result depends on is skipped. (A NaN channel is
# dropped where F.linear would propagate it.)
DENSE_THRESHOLD = 0.0


def _kernel_skip_reason(p: nn.Linear, x: torch.Tensor, tokens: bool = True) -> str | None:
    """None when projection ``p`` can run ``x`` through the input-sparse kernel (laying its weight out
    input-major first where that is allowed), else why not (``tokens=False``, C++ kernels only: without
    the per-call checks of ``x``)."""
    mode = KernelPolicy.of(p.kernels).mode
    if mode == "off":
        return "kernels are switched off"
    on_cpu = kernels.uses_cpu_kernels(p.kernels, x.device) and isinstance(p, SparseInputLinear)
    if mode == "auto" and x.device.type != "cuda" and not on_cpu:
        return f"input is on {x.device.type}; kernels='auto' uses them on CUDA only"
    if on_cpu and kernels.cpu.extension_reason() is not None:
        return kernels.cpu.extension_reason()
    if not is_input_major(p):
        if not relayout_allowed(x):
            return "the weight is not input-major; call countdown.set_kernels(model) before capture"
        use_input_major(p, True)  # first eager call after the model moved to the GPU (or to the CPU)
    if on_cpu:
        return kernels.cpu.unavailable_reason(x, p.weight.t()) if tokens else kernels.cpu.weights_reason(p.weight.t())
    return kernels.input_sparse_unavailable_reason(x, p.weight.t())


def _take_given(p: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """The output the fused attention forward computed for ``p`` from this very ``x`` (bias added), once."""
    given = p._qkv_given
    if given is None or given[0] is not x:
        return None
    p._qkv_given = None
    return given[1] if p.bias is None else given[1] + p.bias


class SparseInputLinear(nn.Linear):
    """An nn.Linear that skips input channels with ``|x| <= threshold`` (set up by `install`)."""

    sparse_threshold: torch.Tensor  # [1] float32 buffer
    spec: SparsitySpec
    site: str
    layer_idx: int
    sparse_from: int | None
    kernels: KernelPolicy  # which path and variant serve decode tokens (`countdown.set_kernels`)
    meter: SparsityMeter | None
    _qkv_given: tuple[torch.Tensor, torch.Tensor] | None  # set by QKVFusedAttention for one forward
    # True while `countdown.cpu_route.dense_linears` routes the model: dense positions through the C++ GEMV
    cpu_dense_route: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = _take_given(self, x)
        if given is not None:
            return given
        # x: [B, T, in]; a projection acts per position, so splitting along T is exact
        n = x.shape[-2] if x.dim() > 1 else 1
        n_dense = dense_positions(self.spec, self.sparse_from, n)
        if n_dense == 0:
            return self._sparse(x)
        dense_linear = cpu_route.routed_linear if self.cpu_dense_route else F.linear
        dense = dense_linear(x[..., :n_dense, :], self.weight, self.bias)
        if n_dense == n:
            return dense
        return torch.cat([dense, self._sparse(x[..., n_dense:, :])], dim=-2)

    def kernel_skip_reason(self, x: torch.Tensor) -> str | None:
        """None when ``x`` can run through the input-sparse GEMV, else why not. On a CPU (eagerly) the
        answer for the projection itself (policy, meter, the weight's layout, the extension) is kept while
        those stay the same; the token count and autograd are looked at on each call."""
        if self.meter is not None:
            return "measured-sparsity tracking is on (evaluation counts every mask on the reference path)"
        if not torch.compiler.is_compiling() and kernels.uses_cpu_kernels(self.kernels, x.device):
            state = (self.kernels, kernels.cpu.weight_key(self.weight), kernels.cpu.extension_reason())
            kept = self.__dict__.get("_cpu_skip")
            if kept is None or kept[0] != state:
                reason = _kernel_skip_reason(self, x, tokens=False)
                # the state after the check (it lays the weight out anew where it has to)
                state = (self.kernels, kernels.cpu.weight_key(self.weight), state[-1])
                kept = self.__dict__["_cpu_skip"] = (state, reason)
            if kept[1] is not None:
                return kept[1]
            return kernels.cpu.tokens_reason(x, self.weight)
        return _kernel_skip_reason(self, x)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_skip_reason(x) is None:
            ops = kernels.cpu if kernels.uses_cpu_kernels(self.kernels, x.device) else kernels
            y = ops.input_sparse_linear(x, self.weight.t(), self.sparse_threshold, policy=self.kernels)
            return y if self.bias is None else y + self.bias
        keep = (x.abs() > self.sparse_threshold.to(x.dtype)).to(x.dtype)
        if self.meter is not None:
            self.meter.add(self.site, keep)
        return F.linear(x * keep, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input sparsity site={self.site}, sparsity={self.spec.attention}"


class FusedQKVLinear(nn.Linear):
    """A dense q, k or v projection of a layer fused by `fuse_qkv`: returns the output its attention
    module computed for all three in one launch, else ``F.linear`` as nn.Linear does."""

    kernels: KernelPolicy  # as SparseInputLinear's
    _qkv_given: tuple[torch.Tensor, torch.Tensor] | None
    _qkv_input_major: bool  # the weight's layout before `fuse_qkv` (restored by `unfuse_qkv`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = _take_given(self, x)
        return F.linear(x, self.weight, self.bias) if given is None else given

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q/k/v fused (dense)"


class QKVFusedAttention(nn.Module):
    """Mixed in before a model's attention class (``type(attn)`` becomes a subclass of both): q, k and v
    in one launch for decode-sized inputs, then the model's own forward. See the module docstring."""

    _qkv_dense: bool  # `fuse_qkv` asked for it (dense projections return to FusedQKVLinear on `remove`)
    _qkv_kernels: KernelPolicy  # the kernel policy `fuse_qkv` was given

    def qkv_projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj

    def qkv_skip_reason(self, x: torch.Tensor) -> str | None:
        """None when the forward on ``hidden_states`` x computes q, k and v in one launch, else why not."""
        n_tokens = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] > 0 else 0
        if not 1 <= n_tokens <= MAX_BATCH:
            return f"{n_tokens} tokens: one launch serves decode steps of 1 to {MAX_BATCH} tokens"
        projections = self.qkv_projections()
        if x.device.type != "cuda" and any(KernelPolicy.of(p.kernels).mode == "auto" for p in projections):
            # the one-launch q/k/v kernel is Triton's; on a CPU each projection runs its own C++ kernel
            return f"input is on {x.device.type}; kernels='auto' uses them on CUDA only"
        if all(isinstance(p, SparseInputLinear) for p in projections):
            if not all(KernelPolicy.of(p.kernels).fuse_qkv for p in projections):
                return "the kernel policy's fuse_qkv is off"
            n = x.shape[-2] if x.dim() > 1 else 1
            if any(dense_positions(p.spec, p.sparse_from, n) for p in projections):
                return "the position policy runs some of these positions densely (prefill)"
        elif not all(isinstance(p, FusedQKVLinear) for p in projections):
            return ("q, k and v must be all input-sparse or all fused dense projections, got "
                    + ", ".join(type(p).__name__ for p in projections))
        for name, p in zip(QKV_NAMES, projections):
            if parallel.is_sharded(p.weight):
                return f"{name}: the weight is a tensor-parallel shard (one launch serves one process)"
            reason = p.kernel_skip_reason(x) if isinstance(p, SparseInputLinear) else _kernel_skip_reason(p, x)
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.qkv_skip_reason(hidden_states) is not None:
            return super().forward(hidden_states, *args, **kwargs)
        from .kernels import input_sparse_prefetch

        projections = self.qkv_projections()
        thresholds = [p.sparse_threshold if isinstance(p, SparseInputLinear) else DENSE_THRESHOLD
                      for p in projections]
        ys = input_sparse_prefetch.input_sparse_multi(hidden_states, [p.weight.t() for p in projections], thresholds,
                                                      policy=projections[0].kernels)
        for p, y in zip(projections, ys):
            p._qkv_given = (hidden_states, y)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            for p in projections:
                p._qkv_given = None


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"QKVFused{cls.__name__}", (QKVFusedAttention, cls), {"_qkv_original": cls})
    return _FUSED_CLASSES[cls]


def _wrap(attn: nn.Module) -> None:
    if not isinstance(attn, QKVFusedAttention):
        attn.__class__ = _fused_class(type(attn))
    for p in attn.qkv_projections():
        p._qkv_given = None


def _unwrap(attn: nn.Module) -> None:
    for p in attn.qkv_projections():
        p.__dict__.pop("_qkv_given", None)
    attn.__class__ = attn._qkv_original
    for name in ("_qkv_dense", "_qkv_kernels"):
        attn.__dict__.pop(name, None)


def _attention_modules(model: nn.Module, sites: list[AttentionSite]) -> list[nn.Module | None]:
    """Each site's attention module (the parent of its q_proj), or None where q, k and v are one
    projection (Phi-3's qkv_proj)."""
    parents = {id(child): m for m in model.modules() for child in m.children()}
    out = []
    for site in sites:
        attn = parents.get(id(site.qkv[0])) if len(site.qkv) == 3 else None
        if attn is not None and tuple(getattr(attn, n, None) for n in QKV_NAMES) != tuple(site.qkv):
            attn = None
        out.append(attn)
    return out


def _projections(site: AttentionSite) -> list[tuple[nn.Linear, str]]:
    return [(p, "qkv") for p in site.qkv] + [(site.o, "o")]


def check_supported(model: nn.Module) -> list[AttentionSite]:
    """The attention sites, or a clear error when the model's projections are not plain nn.Linear."""
    sites = attention_sites(model)
    for site in sites:
        for projection, _ in _projections(site):
            if type(projection) not in (nn.Linear, SparseInputLinear, FusedQKVLinear):
                raise TypeError(f"layer {site.layer}: attention projection is a {type(projection).__name__}, "
                                "countdown's attention paths need plain nn.Linear projections")
    return sites


def install(model: nn.Module, spec: SparsitySpec, thresholds: torch.Tensor) -> None:
    """Make every attention projection input-sparse; ``thresholds`` [L, 2] for the sites ("qkv", "o").
    Layers with separate q, k and v get `QKVFusedAttention` (one launch while the policy's fuse_qkv is on)."""
    sites = check_supported(model)
    for site, attn in zip(sites, _attention_modules(model, sites)):
        for projection, name in _projections(site):
            projection.__class__ = SparseInputLinear
            thr = thresholds[site.layer, SITES.index(name)].reshape(1).float().clone()
            projection.register_buffer("sparse_threshold", thr.to(projection.weight.device), persistent=False)
            projection.spec, projection.site, projection.layer_idx = spec, name, site.layer
            projection.sparse_from, projection.kernels, projection.meter = None, KernelPolicy(), None
            projection._qkv_given = None
        if attn is not None and not parallel.is_sharded(site.qkv[0].weight):
            _wrap(attn)


def sparse_projections(model: nn.Module) -> list[SparseInputLinear]:
    return [m for m in model.modules() if isinstance(m, SparseInputLinear)]


def fused_attention_modules(model: nn.Module) -> list[QKVFusedAttention]:
    """The attention modules that compute q, k and v in one launch (input-sparse, or dense by `fuse_qkv`)."""
    return [m for m in model.modules() if isinstance(m, QKVFusedAttention)]


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
    """Dense attention projections again, in nn.Linear's own layout (fused dense where `fuse_qkv` was
    called before: it stays in force until `unfuse_qkv`)."""
    for p in sparse_projections(model):
        use_input_major(p, False)
        del p.sparse_threshold
        for name in ("spec", "site", "layer_idx", "sparse_from", "kernels", "meter", "_qkv_given"):
            p.__dict__.pop(name, None)
        p.__class__ = nn.Linear
    for attn in fused_attention_modules(model):
        if attn.__dict__.get("_qkv_dense", False):
            _fuse_layer(attn, attn._qkv_kernels)
        else:
            _unwrap(attn)


def set_kernels(model: nn.Module, policy: str | KernelPolicy = "auto") -> int:
    """As `countdown.ffn.set_kernels`, for the input-sparse attention projections and the dense ones
    fused by `fuse_qkv`. Returns how many projections it set."""
    policy = KernelPolicy.of(policy)
    mode = policy.mode
    projections = sparse_projections(model)
    for p in projections:
        p.kernels = policy
        cpu_served = kernels.uses_cpu_kernels(policy, p.weight.device) and kernels.cpu.extension_reason() is None
        use_input_major(p, mode == "always" or (mode == "auto" and (p.weight.is_cuda or cpu_served)))
    fused = 0
    for attn in fused_attention_modules(model):
        if attn.__dict__.get("_qkv_dense", False):
            fused += sum(isinstance(p, FusedQKVLinear) for p in attn.qkv_projections())
            _fuse_layer(attn, policy)
    return len(projections) + fused


# --------------------------------------------------------------------------------------------
# dense q, k and v in one launch (opt-in)


def _fuse_layer(attn: nn.Module, policy: KernelPolicy) -> None:
    _wrap(attn)
    attn._qkv_dense, attn._qkv_kernels = True, policy
    for p in attn.qkv_projections():
        if type(p) is nn.Linear:
            p.__dict__.setdefault("_qkv_input_major", is_input_major(p))
            p.__class__ = FusedQKVLinear
        if isinstance(p, FusedQKVLinear):
            p.kernels = policy
            if policy.mode == "always" or (policy.mode == "auto" and p.weight.is_cuda):
                use_input_major(p, True)  # now, not inside a compile trace or a graph capture


def fuse_qkv(model: nn.Module, kernels: str | KernelPolicy = "auto") -> int:
    """Compute every layer's dense q, k and v projections in one launch for decode steps (opt-in).

    The attention input goes through the input-sparse kernel with threshold 0 (`DENSE_THRESHOLD`: every
    non-zero channel kept, so the result is F.linear's up to the order of the fp32 sums), one launch for
    the three weights instead of three GEMVs (about 30% less time for q/k/v on an H100 at the Llama-3-8B
    shape). Works eagerly, in CUDA graphs and under torch.compile (`countdown.Decoder(..., compile=True)`,
    `countdown.generate(..., compile=True)`); prefill (more than 16 tokens) runs the model's own path.
    Composes with FFN sparsity (`countdown.sparsify` before or after) and with attention-input sparsity
    (whose projections are fused already while their policy's ``fuse_qkv`` is on, and which
    takes precedence until `countdown.unsparsify`, after which the dense fusion is back).

    ``kernels``: a `countdown.KernelPolicy` or its mode, "auto" (CUDA decode steps), "always" (also
    Triton's CPU interpreter) or "off". The
    weights of q, k and v are stored input-major (a transposed view of one contiguous copy: same values,
    same ``state_dict``, no extra memory); `unfuse_qkv` restores the modules. Returns the number of
    layers fused. Raises UnsupportedModelError for families countdown does not know, TypeError for
    projections that are not plain nn.Linear, ValueError where q, k and v are one projection already
    (Phi-3's qkv_proj) or are tensor-parallel shards."""
    policy = KernelPolicy.of(kernels)
    sites = check_supported(model)
    attns = _attention_modules(model, sites)
    for site, attn in zip(sites, attns):
        if attn is None:
            raise ValueError(f"layer {site.layer}: q, k and v are one projection already "
                             f"({type(site.qkv[0]).__name__} of {site.qkv[0].out_features} outputs, e.g. "
                             "Phi-3's qkv_proj): there is nothing to fuse")
        if any(parallel.is_sharded(p.weight) for p in site.qkv):
            raise ValueError(f"layer {site.layer}: q, k and v are tensor-parallel shards; fuse_qkv serves one process")
    for attn in attns:
        _fuse_layer(attn, policy)
    return len(attns)


def unfuse_qkv(model: nn.Module) -> int:
    """Undo `fuse_qkv`: plain nn.Linear q, k and v in their original layout and the attention module's
    own class (input-sparse projections, if installed, stay as they are). Returns the layers unfused."""
    n = 0
    for attn in fused_attention_modules(model):
        if not attn.__dict__.get("_qkv_dense", False):
            continue
        n += 1
        for p in attn.qkv_projections():
            if isinstance(p, FusedQKVLinear):
                use_input_major(p, p._qkv_input_major)
                for name in ("kernels", "_qkv_given", "_qkv_input_major"):
                    p.__dict__.pop(name, None)
                p.__class__ = nn.Linear
            p.__dict__.pop("_qkv_input_major", None)
        if any(isinstance(p, SparseInputLinear) for p in attn.qkv_projections()):
            attn._qkv_dense = False
        else:
            _unwrap(attn)
    return n
