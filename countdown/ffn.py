"""The modules that take the place of a model's FFN, the per-token mask rule, and the kernel path.

* `SparseFFN` replaces a gated MLP (``layer.mlp``). It keeps the original projection modules under
  their original names, so ``state_dict()`` keys, ``save_pretrained`` and weight tying are untouched.
  It runs decode tokens through its method's Triton kernel on CUDA (`SparseFFN.kernel_skip_reason`
  says when and why not) and everything else through the method's reference ``forward``.
* `SparseActivation` replaces the activation of a plain FFN (GPT-2, OPT, GPT-NeoX): there the
  activation's output *is* the coefficient vector, so masking it is masking the FFN. Methods that must
  see the FFN input (TEAL, the predictor) get it from a forward pre-hook on the input projection.

What a model's sparsification *is* is one frozen `countdown.spec.SparsitySpec` shared by all its
modules. Thresholds, predictors and per-neuron calibration statistics (``stat_<name>``) are
non-persistent buffers: they travel with ``.to()`` but never enter the model's checkpoint
(`countdown.artifact` writes them). Constants derived from the weights (column norms, SVD factors) are
computed on first use and cached until the weights change.

One copy of each weight: the kernels want W_down as ``[I, H]`` rows (a skipped neuron is one skipped
contiguous row). When the kernel path is enabled, ``down_proj.weight`` becomes a transposed *view* of
such a tensor: same values, shape, key and ``state_dict``; ``F.linear`` (prefill, reference path) reads
the same storage. `unsparsify` puts the original layout back.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import kernels, parallel
from .methods import Keep, Method
from .models import FFNSite
from .options import KernelPolicy
from .spec import SparsitySpec, dense_positions, topk_mask


class DenseForwardWarning(UserWarning):
    """A multi-token forward of a positions="decode" model ran densely although it returns every position's logits."""


_CACHE_ARGUMENTS = ("past_key_values", "cache")  # "cache" in transformers >= 5.25
_LOGITS_ARGUMENTS = ("logits_to_keep", "num_logits_to_keep")


class ScoringForwards:
    """Tells a generation prefill from a scoring forward, for a model sparsified with positions="decode".

    Forward hooks on the top-level model. A multi-token forward

    * that asks for some positions' logits only (``logits_to_keep``: what ``model.generate``,
      `countdown.generate` and `Decoder` prefill with) is a **prefill**: dense, as the policy says;
    * that returns logits for every position and fills no KV cache (``model(ids)``, lm-eval's ``HFLM``,
      a perplexity loop) is a **scoring forward**: every position runs sparse, as if the text had been
      decoded token by token (``sparse_from = 0`` on every module with a position policy);
    * that is given a KV cache *and* returns every position's logits stays a dense prefill, and warns
      once (`DenseForwardWarning`): it may be a chunked scoring loop.

    Forwards where an evaluation helper has set ``sparse_from`` / ``sparse_positions`` itself
    (`countdown.perplexity`, `countdown.lm_eval_model.CountdownLM`) are left alone. Single-token forwards
    (decode steps) return at once: one shape check, nothing else; `Decoder` calls ``model.forward``
    directly, which runs no hooks at all, so captured or compiled steps never see this.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.warned = False
        self._overridden: list[nn.Module] = []
        self._handles = (model.register_forward_pre_hook(self._before, with_kwargs=True),
                         model.register_forward_hook(self._after, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None or x.dim() < 2 or x.shape[1] <= 1:
            return
        policy = [m for m in self.model.modules() if hasattr(m, "sparse_from") and getattr(m, "spec", None) is not None
                  and m.spec.positions == "decode"]
        if any(m.sparse_from is not None or getattr(m, "sparse_positions", None) is not None for m in policy):
            return  # an evaluation helper chose the dense and sparse positions of this forward
        if any(_restricts(kwargs.get(name)) for name in _LOGITS_ARGUMENTS):
            return  # a prefill
        if any(kwargs.get(name) is not None for name in _CACHE_ARGUMENTS):
            if policy and not self.warned:
                self.warned = True
                warnings.warn(
                    "countdown: a forward of several tokens with a KV cache ran DENSELY (positions='decode': a "
                    "forward that fills a cache is a generation prefill). If it scores text, its logits are the "
                    "dense model's. For sparse scores call the model without a cache (every position sparse), "
                    "sparsify with positions='all', or use countdown.perplexity / the lm-eval model "
                    "'countdown' (context dense, continuation sparse). This warning is shown once per model.",
                    DenseForwardWarning, stacklevel=3)
            return
        for m in policy:
            m.sparse_from = 0
        self._overridden = policy

    def _after(self, module: nn.Module, args: tuple, output) -> None:
        if self._overridden:
            for m in self._overridden:
                m.sparse_from = None
            self._overridden = []


def _restricts(logits_to_keep) -> bool:
    """Whether a ``logits_to_keep`` argument asks for fewer than every position's logits (0/None: all)."""
    if logits_to_keep is None:
        return False
    if isinstance(logits_to_keep, torch.Tensor):
        return True
    return int(logits_to_keep) != 0


class Masker(nn.Module):
    """The mask rule of one layer: exact top-k per token, or a calibrated threshold per site.

    ``forward(site, score [..., I]) -> mask [..., I]`` of 0/1 in the score's dtype."""

    def __init__(self, spec: SparsitySpec, thresholds: torch.Tensor | None,
                 sparsities: Sequence[float] | None = None):
        super().__init__()
        self.spec = spec
        # top-k: the fraction dropped per site, this layer's own under a non-uniform allocation
        self.sparsities = tuple(sparsities) if sparsities is not None else (spec.sparsity,) * len(spec.sites)
        init = thresholds if thresholds is not None else torch.zeros(len(spec.sites))
        self.register_buffer("thresholds", init.detach().clone().float().reshape(len(spec.sites)),
                             persistent=False)

    def threshold(self, site: str) -> torch.Tensor:
        """The site's threshold as a 1-element view (on the module's device: no copy per call)."""
        i = self.spec.sites.index(site)
        return self.thresholds[i : i + 1]

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        if self.spec.mode == "topk":
            return topk_mask(score, self.sparsities[self.spec.sites.index(site)], self.spec.count_rule, self.spec.ties)
        return (score > self.threshold(site).to(score.dtype)).to(score.dtype)


class SparsityMeter:
    """Counts, per site, how many mask entries were zero: the *measured* sparsity."""

    def __init__(self) -> None:
        self.skipped: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}

    def add(self, site: str, mask: torch.Tensor) -> None:
        self.skipped[site] = self.skipped.get(site, 0) + (mask == 0).sum(dtype=torch.float64)
        self.seen[site] = self.seen.get(site, 0) + mask.numel()

    def measured(self, sites: tuple[str, ...]) -> dict[str, float]:
        """Skipped fraction per site (NaN where nothing was seen)."""
        return {s: float(self.skipped[s]) / self.seen[s] if self.seen.get(s) else float("nan") for s in sites}


class _SparseModule(nn.Module):
    """What both replacement modules share: method, mask rule, spec, optional predictor and meter."""

    def _setup(self, site: FFNSite, method: Method, rule: Keep, spec: SparsitySpec | None,
               predictor: dict[str, torch.Tensor] | None, stats: dict[str, torch.Tensor] | None) -> None:
        self.layer_idx = site.layer
        self.kind = site.kind
        self.method = method
        self.masker = rule  # a Masker, or a calibration recorder with the same signature
        self.spec = spec
        self.act_name = site.act_name
        self.kernel_act = site.kernel_act
        self.meter: SparsityMeter | None = None
        self._row_mask: torch.Tensor | None = None  # the [B, T] mask of a row-wise split, while it runs
        # positions="decode" only: positions before this index of a multi-token forward stay dense ...
        self.sparse_from: int | None = None
        # ... or, per row, exactly the positions marked True in this [B, T] bool mask are sparse (an
        # lm-eval batch of right-padded requests with different context lengths; see `countdown.tasks`)
        self.sparse_positions: torch.Tensor | None = None
        if predictor is not None:
            dtype = next(iter(site.modules.values())).weight.dtype
            for key, value in predictor.items():  # stored in the model's dtype: bytes as the kernel reads them
                self.register_buffer(f"predictor_{key}", value.detach().to(dtype).clone(), persistent=False)
        self.has_predictor = predictor is not None
        # low-rank (V, U) or bitlinear (W) predictor, with or without a bias (see `countdown.predictor`)
        self.predictor_kind = "bitlinear" if predictor is not None and "W" in predictor else "lowrank"
        self.predictor_has_bias = predictor is not None and "b" in predictor
        for name, value in (stats or {}).items():  # float32: a per-neuron constant, cast where used
            self.register_buffer(f"stat_{name}", value.detach().float().clone(), persistent=False)

    def keep(self, site: str, score: torch.Tensor) -> torch.Tensor:
        mask = self.masker(site, score)
        if self.meter is not None:
            self.meter.add(site, mask)
        return mask

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictor logits [..., I]: low-rank ``(x V) Uᵀ [+ b]`` or bitlinear ``x Wᵀ [+ b]`` (see
        `countdown.predictor`)."""
        if not self.has_predictor:
            raise RuntimeError(
                f"layer {self.layer_idx}: method {self.method.name!r} needs trained predictors; "
                "run `countdown train-predictors` or `countdown.train_predictors(...)` first"
            )
        if self.predictor_kind == "bitlinear":
            w = self.predictor_W
            logits = x.to(w.dtype) @ w.t()
        else:
            v = self.predictor_V
            logits = (x.to(v.dtype) @ v) @ self.predictor_U.t()
        return logits + self.predictor_b if self.predictor_has_bias else logits

    def stat(self, name: str) -> torch.Tensor:
        """The per-neuron statistic ``name`` ([I], float32) measured on calibration text."""
        value = getattr(self, f"stat_{name}", None)
        if value is None:
            raise RuntimeError(
                f"layer {self.layer_idx}: method {self.method.name!r} needs the per-neuron statistic {name!r} "
                "measured on calibration text; sparsify with calibration=... (also in top-k mode)"
            )
        return value

    def needs_input(self) -> bool:
        return any(site.endswith("input") for site in self.method.sites) or self.method.needs_predictor

    def _dense_positions(self, x: torch.Tensor) -> int | torch.Tensor:
        """Which positions of this forward (x: [B, T, ·] or [T, ·]) run densely under the spec's position
        policy: a count of leading positions (every row), or a [B, T] bool mask of the *sparse* ones."""
        if self.sparse_positions is not None and self.spec is not None and self.spec.positions != "all":
            if x.dim() != 3 or tuple(self.sparse_positions.shape) != tuple(x.shape[:2]):
                raise ValueError(f"layer {self.layer_idx}: sparse_positions has shape "
                                 f"{tuple(self.sparse_positions.shape)}, the FFN input {tuple(x.shape)}")
            return self.sparse_positions.to(x.device)
        return dense_positions(self.spec, self.sparse_from, x.shape[-2] if x.dim() > 1 else 1)

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self, x, self.keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H] (or [T, H]); an FFN acts per position, so splitting positions is exact
        n_dense = self._dense_positions(x)
        if isinstance(n_dense, torch.Tensor):
            return self._forward_rows(x, n_dense)
        if n_dense == 0:
            return self._sparse_forward(x)
        dense = self._dense_forward(x[..., :n_dense, :])
        if n_dense == x.shape[-2]:
            return dense
        return torch.cat([dense, self._sparse_forward(x[..., n_dense:, :])], dim=-2)

    def _forward_rows(self, x: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """The positions marked in ``sparse`` ([B, T] bool) through the sparse path as one [N, H] batch,
        the rest densely: no position is computed twice, and the meter sees the sparse ones only."""
        self._row_mask = sparse
        try:
            out_sparse = self._sparse_forward(x[sparse])
            out_dense = self._dense_forward(x[~sparse])
        finally:
            self._row_mask = None
        out = out_sparse.new_empty(*x.shape[:-1], out_sparse.shape[-1])
        out[sparse] = out_sparse
        out[~sparse] = out_dense.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        spec = self.spec
        if spec is None:
            return f"layer={self.layer_idx}, method={self.method.name}"
        sparsity = spec.sparsity if spec.allocation is None else dict(zip(spec.sites, self.masker.sparsities))
        return (f"layer={self.layer_idx}, method={spec.method}, sparsity={sparsity}, mode={spec.mode}, "
                f"protocol={spec.protocol!r}")


class SparseFFN(_SparseModule):
    """Drop-in replacement for a gated MLP (Llama/Mistral/Qwen/Gemma/Phi-3)."""

    # which path and kernel variant serve decode tokens (`countdown.KernelPolicy`; its mode "auto": Triton
    # kernels on CUDA, the C++ ones of `countdown.kernels.cpu` on a CPU; "off": reference path only; "always":
    # wherever Triton runs them, the CPU interpreter included, for tests). Set with `set_kernels`.
    kernels = KernelPolicy()

    def __init__(self, site: FFNSite, method: Method, rule: Keep, spec: SparsitySpec | None = None,
                 predictor: dict | None = None, stats: dict | None = None):
        super().__init__()
        self.original = [site.module]  # a list, so the old module is not registered twice
        for name, module in site.modules.items():
            self.add_module(name, module)
        self.add_module(site.act_attr, site.act)  # same name as in the original MLP
        self._act = site.act
        self._fused = "gate_up_proj" in site.modules
        self._derived: dict[tuple, tuple[tuple, object]] = {}
        self.shard = parallel.ffn_shard(site)  # this rank's neurons under tensor parallelism, else None
        self._setup(site, method, rule, spec, predictor, stats)

    # -- FFNParts -------------------------------------------------------------------------------
    def act(self, h: torch.Tensor) -> torch.Tensor:
        return self._act(h)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.gate_weight()) if self._fused else self.gate_proj(x)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.up_weight()) if self._fused else self.up_proj(x)

    def down(self, t: torch.Tensor) -> torch.Tensor:
        return self.down_proj(t)

    def gate_weight(self) -> torch.Tensor:
        """W_gate [I, H] (for Phi-3, the first half of the fused gate_up rows: a contiguous view)."""
        if self._fused:
            w = self.gate_up_proj.weight
            return w[: w.shape[0] // 2]
        return parallel.local(self.gate_proj.weight)  # under TP: this rank's rows, what the kernels read

    def up_weight(self) -> torch.Tensor:
        if self._fused:
            w = self.gate_up_proj.weight
            return w[w.shape[0] // 2 :]
        return parallel.local(self.up_proj.weight)

    def down_t(self) -> torch.Tensor:
        """W_down as [I, H]: contiguous once the kernel layout is in place (`use_kernel_layout`)."""
        return parallel.local(self.down_proj.weight).t()

    def _matrix(self, which: str) -> torch.Tensor:
        """W_gate, W_up ([I, H]) or W_down ([H, I]) in nn.Linear's [out, in] layout."""
        if which == "gate":
            return self.gate_weight()
        if which == "up":
            return self.up_weight()
        if which == "down":
            return self.down_proj.weight
        raise ValueError(f"unknown FFN matrix {which!r}; choose gate, up or down")

    def _cached(self, key: tuple, weight: torch.Tensor, compute):
        # keyed on the weight's storage and version: a new layout, device, dtype or an in-place
        # update of the weight recomputes (the values are a pure function of the weight)
        stamp = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        hit = self._derived.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = self._derived[key] = (stamp, compute(weight.detach()))
        return hit[1]

    def column_norms(self, which: str) -> torch.Tensor:
        """‖W[:, j]‖₂ for every input channel j of W_gate, W_up ([H]) or W_down ([I]), in float32."""
        return self._cached(("norms", which), self._matrix(which),
                            lambda w: torch.linalg.vector_norm(w, dim=0, dtype=torch.float32))

    def low_rank(self, which: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [in, r], B [r, out]) in the weight's dtype with ``(v @ A) @ B`` = W_r v, W_r the rank-r
        truncated SVD of W_gate, W_up or W_down (computed in float32)."""
        return self._cached(("svd", which, rank), self._matrix(which), lambda w: _truncated_svd(w, rank))

    def has_bias(self) -> bool:
        projections = (self.gate_up_proj,) if self._fused else (self.gate_proj, self.up_proj)
        return any(p.bias is not None for p in (*projections, self.down_proj))

    def ffn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mask_input(self, x: torch.Tensor, keep: Keep) -> torch.Tensor:
        return x * keep("input", x.abs())

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))

    # -- the fast path --------------------------------------------------------------------------
    def input_major(self) -> list[torch.Tensor]:
        """W_gate and W_up as [H, I] (or the fused [H, 2I]): contiguous in a TEAL kernel layout."""
        if self._fused:
            return [self.gate_up_proj.weight.t()]
        return [parallel.local(self.gate_proj.weight).t(), parallel.local(self.up_proj.weight).t()]

    def threshold(self, site: str) -> torch.Tensor:
        return self.masker.threshold(site)

    def _input_major_projections(self) -> list[nn.Module]:
        """The projections the method's kernel reads input-major (see `Method.kernel_layout`)."""
        wanted = self.method.kernel_layout
        projections = [self.down_proj] if "down" in wanted else []
        if "gate" in wanted or "up" in wanted:
            projections += [self.gate_up_proj] if self._fused else [self.gate_proj, self.up_proj]
        return projections

    def kernel_layout_ready(self) -> bool:
        return all(is_input_major(p) for p in self._input_major_projections())

    def use_kernel_layout(self, on: bool) -> None:
        """Store the kernel's projections input-major, or as nn.Linear does (`use_input_major`)."""
        for projection in self._input_major_projections():
            use_input_major(projection, on)

    def kernel_skip_reason(self, x: torch.Tensor) -> str | None:
        """None when ``x`` (decode tokens) can run through the method's kernel, else why not.

        On a CPU (eagerly) the answer for the module itself (policy, method, spec, meter, the weights'
        dtype and layout, the extension) is kept while `_cpu_state` stays the same, and only what changes
        from call to call (the token count, autograd) is looked at each time: the full check costs more
        than the one-token kernel of a small layer."""
        if not torch.compiler.is_compiling() and kernels.uses_cpu_kernels(self.kernels, x.device):
            state = self._cpu_state()
            kept = self.__dict__.get("_cpu_skip")
            if kept is None or kept[0] != state:
                reason = self._skip_reason(x, tokens=False)
                kept = self.__dict__["_cpu_skip"] = (self._cpu_state(), reason)  # the state after a relayout
            if kept[1] is not None:
                return kept[1]
            return kernels.cpu.tokens_reason(x, *(self._kernel_weights() if torch.is_grad_enabled() else ()))
        return self._skip_reason(x)

    def _cpu_state(self) -> tuple:
        """What a CPU module's kernel verdict depends on besides the tokens: a changed policy, spec or meter,
        a weight laid out anew (a new Parameter) or moved (new storage), or the extension's state."""
        projections = (self.gate_up_proj,) if self._fused else (self.gate_proj, self.up_proj)
        weights = tuple(kernels.cpu.weight_key(p.weight) for p in (*projections, self.down_proj))
        return (self.kernels, self.spec, self.meter, self.method, weights, kernels.cpu.extension_reason())

    def _skip_reason(self, x: torch.Tensor, tokens: bool = True) -> str | None:
        """`kernel_skip_reason` in full (``tokens=False``: without the per-call checks of ``x``)."""
        policy = KernelPolicy.of(self.kernels)
        if policy.mode == "off":
            return "kernels are switched off"
        if not self.method.has_kernel:
            return f"method {self.method.name!r} has no kernel"
        if self.spec is None or self.spec.mode != "threshold":
            return "the kernels apply calibrated thresholds only (top-k mode uses the reference path)"
        if self.meter is not None:
            return "measured-sparsity tracking is on (evaluation counts every mask on the reference path)"
        if self.kernel_act is None:
            return f"activation {self.act_name!r} has no kernel"
        if self.has_bias():
            return "the FFN's projections have biases, which the kernels do not add"
        on_cpu = kernels.uses_cpu_kernels(policy, x.device)
        if policy.mode == "auto" and x.device.type not in ("cuda", "cpu"):
            return f"input is on {x.device.type}; kernels='auto' uses them on CUDA and the CPU only"
        if on_cpu and kernels.cpu.extension_reason() is not None:
            return kernels.cpu.extension_reason()
        if not self.kernel_layout_ready():
            if not relayout_allowed(x):
                return "the weights are not in the kernel layout; call countdown.set_kernels(model) before capture"
            self.use_kernel_layout(True)  # first eager call after the model moved to the GPU (or to the CPU)
        if on_cpu:
            weights = self._kernel_weights()
            if not tokens:
                return kernels.cpu.weights_reason(*weights)
            return kernels.cpu.unavailable_reason(x, *weights)
        return kernels.kernel_unavailable_reason(x, self.down_t())

    def _kernel_weights(self) -> list[torch.Tensor]:
        """The weights the method's kernel reads, in the layout it reads them."""
        if "gate" in self.method.kernel_layout:
            return [*self.input_major(), self.down_t()]
        return [self.gate_weight(), self.up_weight(), self.down_t()]

    def kernel_ops(self, x: torch.Tensor):
        """The ops serving decode tokens ``x`` once `kernel_skip_reason` said None: `countdown.kernels.cpu`
        (C++) or `countdown.kernels` (Triton; on a CPU its interpreter, under kernels="always")."""
        return kernels.cpu if kernels.uses_cpu_kernels(self.kernels, x.device) else kernels

    def _sparse_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_skip_reason(x) is None:
            # under TP the kernel's output is this rank's partial sum, as W_down's own forward is before its all-reduce
            return parallel.all_reduce(self.method.kernel_forward(self, x), self.shard)
        return self.method.forward(self, x, self.keep)


def _truncated_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with W_r = (A B)ᵀ for W [out, in]. W_r is W projected on its top-r singular subspace, found
    by an eigendecomposition of the smaller Gram matrix: much faster than a full SVD of a wide matrix on
    a GPU, and exact for the top singular directions that a small rank keeps."""
    w32 = w.float()
    if w32.shape[0] >= w32.shape[1]:  # W_r = W V_r V_rᵀ, V_r the top eigenvectors of WᵀW [in, in]
        v = torch.linalg.eigh(w32.t() @ w32).eigenvectors[:, -rank:]
        a, b = v, (w32 @ v).t()
    else:  # W_r = U_r U_rᵀ W, U_r the top eigenvectors of W Wᵀ [out, out]
        u = torch.linalg.eigh(w32 @ w32.t()).eigenvectors[:, -rank:]
        a, b = w32.t() @ u, u.t()
    return a.contiguous().to(w.dtype), b.contiguous().to(w.dtype)


def is_input_major(linear: nn.Module) -> bool:
    """Whether ``linear.weight`` is a transposed view of contiguous [in, out] rows (this rank's shard)."""
    return parallel.local(linear.weight).t().is_contiguous()


def use_input_major(linear: nn.Module, on: bool) -> None:
    """Store ``linear.weight`` input-major (a transposed view of contiguous [in, out] rows: a skipped
    input channel is one contiguous row) or as nn.Linear does ([out, in] rows). Same values, same
    ``state_dict``, one copy; a tensor-parallel shard stays sharded."""
    w = linear.weight
    if is_input_major(linear) == on:
        return
    data = parallel.relayout(w.detach(), (lambda v: v.t().contiguous().t()) if on else (lambda v: v.contiguous()))
    linear.weight = nn.Parameter(data, requires_grad=w.requires_grad)


def relayout_allowed(x: torch.Tensor) -> bool:
    """A weight may be laid out anew now: not inside a torch.compile trace or a CUDA-graph capture."""
    return not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


class SparseActivation(_SparseModule):
    """Replaces the activation of a plain FFN; masks the coefficient ``act(W_in x)``.

    ``gate`` here returns the pre-activation it was called with: the model has already applied W_in.
    """

    kind = "plain"
    kernel_act = None

    def __init__(self, site: FFNSite, method: Method, rule: Keep, spec: SparsitySpec | None = None,
                 predictor: dict | None = None, stats: dict | None = None):
        super().__init__()
        self.original = [site.module]
        self._act = site.act
        self._in_proj = [site.modules["in_proj"]]  # not a child: it belongs to the model
        self._input: torch.Tensor | None = None
        self._setup(site, method, rule, spec, predictor, stats)
        self._hook = None
        if self.needs_input():
            self._hook = site.modules["in_proj"].register_forward_pre_hook(self._see_input)

    def _see_input(self, module, args):
        x = args[0]
        self._input = x
        if "input" not in self.method.sites:
            return None
        # TEAL masks W_in's input channels, at the sparse positions only
        n_dense = self._dense_positions(x)
        if isinstance(n_dense, torch.Tensor):
            rows = x[n_dense]
            x = x.clone()
            x[n_dense] = rows * self.keep("input", rows.abs())
            return (x,) + tuple(args[1:])
        if n_dense == 0:
            return (x * self.keep("input", x.abs()),) + tuple(args[1:])
        if n_dense >= x.shape[-2]:
            return None
        tail = x[..., n_dense:, :]
        x = torch.cat([x[..., :n_dense, :], tail * self.keep("input", tail.abs())], dim=-2)
        return (x,) + tuple(args[1:])

    def remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def act(self, h: torch.Tensor) -> torch.Tensor:
        return self._act(h)

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def up(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - plain FFNs have no up
        raise RuntimeError("plain FFN has no up projection")

    def down(self, t: torch.Tensor) -> torch.Tensor:
        return t  # the model applies W_out after the activation

    def _input_for(self, h: torch.Tensor) -> torch.Tensor:
        """W_in's input at the positions ``h`` holds (all, the sparse tail, or the sparse rows of a split)."""
        x = self._input
        if self._row_mask is not None:
            return x[self._row_mask]
        n_dense = x.shape[-2] - h.shape[-2] if x.dim() > 1 else 0  # the sparse tail of a split forward
        return x[..., n_dense:, :] if n_dense else x

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return super().predict(self._input_for(h))

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self._input_for(h)

    def mask_input(self, h: torch.Tensor, keep: Keep) -> torch.Tensor:
        return h  # W_in's input was masked by the pre-hook before W_in ran; h already reflects it

    def _dense_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._act(h)


def sparse_modules(model: nn.Module) -> list[_SparseModule]:
    """The installed sparse FFN modules, in layer order (empty if the model is dense)."""
    return sorted((m for m in model.modules() if isinstance(m, _SparseModule)), key=lambda m: m.layer_idx)


def is_sparsified(model: nn.Module) -> bool:
    return bool(sparse_modules(model))


def sparsity_spec(model: nn.Module) -> SparsitySpec | None:
    """The model's `SparsitySpec`, or None if it is dense."""
    modules = sparse_modules(model)
    return modules[0].spec if modules else None


def install(
    model: nn.Module,
    sites: list[FFNSite],
    method: Method,
    rules: list[Keep],
    predictors: list[dict[str, torch.Tensor]] | None = None,
    spec: SparsitySpec | None = None,
    stats: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """Put a sparse module in place of every FFN site (all inputs must already be validated)."""
    for i, site in enumerate(sites):
        cls = SparseFFN if site.kind == "gated" else SparseActivation
        predictor = predictors[i] if predictors is not None else None
        module = cls(site, method, rules[i], spec, predictor, stats[i] if stats is not None else None)
        ref = next((p for p in model.parameters()), None)
        if ref is not None:
            module.to(ref.device)
        setattr(site.parent, site.name, module)
    if spec is not None and spec.positions == "decode" and getattr(model, "_countdown_scoring", None) is None:
        model._countdown_scoring = ScoringForwards(model)


def remove(model: nn.Module) -> None:
    """Put the original FFN modules back, with W_down in its original layout; the model is dense."""
    scoring = model.__dict__.pop("_countdown_scoring", None)
    if scoring is not None:
        scoring.remove()
    for module in sparse_modules(model):
        if isinstance(module, SparseActivation):
            module.remove_hook()
        else:
            module.use_kernel_layout(False)
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if child is module:
                    setattr(parent, name, module.original[0])


def set_kernels(model: nn.Module, policy: str | KernelPolicy = "auto") -> int:
    """Store the `countdown.KernelPolicy` (or mode string) on every installed sparse FFN; its mode: "auto"
    (Triton kernels for decode tokens on CUDA, the C++ kernels of `countdown.kernels.cpu` on a CPU where
    they build, reference elsewhere), "off" (always the reference path) or "always" (kernels wherever
    Triton can run them, the CPU interpreter included). Lays W_down out for the kernels now, not inside a
    CUDA-graph capture or a torch.compile trace. Returns how many FFNs were set."""
    policy = KernelPolicy.of(policy)
    mode = policy.mode
    modules = [m for m in sparse_modules(model) if isinstance(m, SparseFFN)]
    for m in modules:
        m.kernels = policy
        device = m.down_proj.weight.device
        served = device.type == "cuda" or (kernels.uses_cpu_kernels(policy, device)
                                           and kernels.cpu.extension_reason() is None)
        wanted = m.method.has_kernel and (mode == "always" or (mode == "auto" and served))
        m.use_kernel_layout(wanted)
    return len(modules)
