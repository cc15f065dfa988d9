"""The modules that take the place of a model's FFN, and the per-token masking they share.

* `SparseFFN` replaces a gated MLP (``layer.mlp``). It keeps the original projection modules under
  their original names, so ``state_dict()`` keys, ``save_pretrained`` and weight tying are untouched.
* `SparseActivation` replaces the activation of a plain FFN (GPT-2, OPT, GPT-NeoX): there the
  activation's output *is* the coefficient vector, so masking it is masking the FFN. Methods that must
  see the FFN input (TEAL, the predictor) get it from a forward pre-hook on the input projection.

Thresholds and predictors are non-persistent buffers: they travel with ``.to()`` but never enter the
model's checkpoint; `countdown.api.save_sparsity` writes them to their own artifact.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .kernel_path import kernel_skip_reason, run_kernel
from .methods import Method
from .models import FFNSite


class Masker(nn.Module):
    """Turns a score into a 0/1 keep-mask per token: exact top-k, or a calibrated per-site threshold.

    Every token position is masked independently. When ``track`` is on it accumulates, per site, how
    many entries were skipped, so the *measured* sparsity can be reported beside the target.
    """

    def __init__(self, sites: tuple[str, ...], sparsity: float, mode: str, thresholds: torch.Tensor | None):
        super().__init__()
        self.sites = sites
        self.sparsity = float(sparsity)
        self.mode = mode
        init = thresholds if thresholds is not None else torch.zeros(len(sites))
        self.register_buffer("thresholds", init.detach().clone().float(), persistent=False)
        self.track = False
        self.collect_sites: set[str] = set()  # sites still being calibrated while earlier ones mask
        self.collected: dict[str, list[torch.Tensor]] = {}
        # one generator per site, seeded by its name: a method's calibration subsample is the same
        # whichever other methods are calibrated in the same pass
        self._rngs: dict[str, torch.Generator] = {}
        self.skipped: dict[str, torch.Tensor] = {}
        self.seen: dict[str, int] = {}

    def threshold(self, site: str) -> torch.Tensor:
        return self.thresholds[self.sites.index(site)]

    # samples of the score kept per call in "collect" mode: enough for a stable quantile, bounded memory
    samples_per_call = 1 << 16

    def forward(self, site: str, score: torch.Tensor) -> torch.Tensor:
        if self.mode == "collect" or site in self.collect_sites:  # calibration: record, mask nothing
            flat = score.detach().reshape(-1).float()
            if flat.numel() > self.samples_per_call:
                rng = self._rngs.get(site)
                if rng is None:
                    rng = self._rngs[site] = torch.Generator().manual_seed(zlib.crc32(site.encode()))
                idx = torch.randint(flat.numel(), (self.samples_per_call,), generator=rng)
                flat = flat[idx.to(flat.device)]
            self.collected.setdefault(site, []).append(flat.cpu())
            return torch.ones_like(score)
        if self.mode == "topk":
            width = score.shape[-1]
            n_keep = width - int(round(self.sparsity * width))
            idx = score.topk(n_keep, dim=-1).indices
            mask = torch.zeros_like(score).scatter_(-1, idx, 1.0)
        else:
            mask = (score > self.threshold(site).to(score.dtype)).to(score.dtype)
        if self.track:
            skipped = (mask == 0).sum(dtype=torch.float64)
            self.skipped[site] = self.skipped.get(site, 0) + skipped
            self.seen[site] = self.seen.get(site, 0) + mask.numel()
        return mask

    def reset_stats(self) -> None:
        self.skipped, self.seen = {}, {}

    def measured(self) -> dict[str, float]:
        """Skipped fraction per site since the last reset (NaN where nothing was seen)."""
        return {s: float(self.skipped[s]) / self.seen[s] if self.seen.get(s) else float("nan") for s in self.sites}


class _SparseModule(nn.Module):
    """What both replacement modules share: the method, the masker, the optional predictor."""

    def _setup(self, site: FFNSite, method: Method, masker: Masker, predictor: dict[str, torch.Tensor] | None):
        self.layer_idx = site.layer
        self.kind = site.kind
        self.method = method
        self.masker = masker
        self.act_name = site.act_name
        if predictor is not None:
            for key, value in predictor.items():
                self.register_buffer(f"predictor_{key}", value.detach().clone(), persistent=False)
        self.has_predictor = predictor is not None

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Low-rank predictor of |t|: ``B · act(A · x)`` (see `countdown.predictor`)."""
        if not self.has_predictor:
            raise RuntimeError(
                f"layer {self.layer_idx}: method {self.method.name!r} needs trained predictors; "
                "run `countdown train-predictors` or `countdown.train_predictors(...)` first"
            )
        from .predictor import apply_predictor  # predictor.py depends on this module's buffers only

        return apply_predictor(self, x)

    def needs_input(self) -> bool:
        return any(site.endswith("input") for site in self.method.sites) or self.method.needs_predictor

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, method={self.method.name}, sparsity={self.masker.sparsity}, mode={self.masker.mode}"


class SparseFFN(_SparseModule):
    """Drop-in replacement for a gated MLP (Llama/Mistral/Qwen/Gemma/Phi-3)."""

    def __init__(self, site: FFNSite, method: Method, masker: Masker, predictor: dict | None = None):
        super().__init__()
        self.original = [site.module]  # a list, so the old module is not registered twice
        for name, module in site.modules.items():
            self.add_module(name, module)
        self.add_module(site.act_attr, site.act)  # same name as in the original MLP
        self._act = site.act
        self._fused = "gate_up_proj" in site.modules
        self._setup(site, method, masker, predictor)

    # -- FFNParts -------------------------------------------------------------------------------
    def act(self, h: torch.Tensor) -> torch.Tensor:
        return self._act(h)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.gate_weight()) if self._fused else self.gate_proj(x)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.up_weight()) if self._fused else self.up_proj(x)

    def down(self, t: torch.Tensor) -> torch.Tensor:
        return self.down_proj(t)

    def gate_weight(self) -> torch.Tensor:
        if self._fused:
            w = self.gate_up_proj.weight
            return w[: w.shape[0] // 2]
        return self.gate_proj.weight

    def up_weight(self) -> torch.Tensor:
        if self._fused:
            w = self.gate_up_proj.weight
            return w[w.shape[0] // 2 :]
        return self.up_proj.weight

    def has_bias(self) -> bool:
        projections = (self.gate_up_proj,) if self._fused else (self.gate_proj, self.up_proj)
        return any(p.bias is not None for p in (*projections, self.down_proj))

    def ffn_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def mask_input(self, x: torch.Tensor, keep) -> torch.Tensor:
        return x * keep("input", x.abs())

    # "auto": Triton kernel for one decode token on CUDA, reference path otherwise (see kernel_path)
    kernels = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_skip_reason(self, x) is None:
            return run_kernel(self, x)
        return self.method.forward(self, x, self.masker)


class SparseActivation(_SparseModule):
    """Replaces the activation of a plain FFN; masks the coefficient ``act(W_in x)``.

    ``gate`` here returns the pre-activation it was called with: the model has already applied W_in.
    """

    def __init__(self, site: FFNSite, method: Method, masker: Masker, predictor: dict | None = None):
        super().__init__()
        self.original = [site.module]
        self._act = site.act
        self._in_proj = [site.modules["in_proj"]]  # not a child: it belongs to the model
        self._input: torch.Tensor | None = None
        self._setup(site, method, masker, predictor)
        self._hook = None
        if self.needs_input():
            self._hook = site.modules["in_proj"].register_forward_pre_hook(self._see_input)

    kind = "plain"

    def _see_input(self, module, args):
        x = args[0]
        self._input = x
        if "input" in self.method.sites:  # TEAL masks W_in's input channels
            return (x * self.masker("input", x.abs()),) + tuple(args[1:])
        return None

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

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return super().predict(self._input)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self._input

    def mask_input(self, h: torch.Tensor, keep) -> torch.Tensor:
        return h  # W_in's input was masked by the pre-hook before W_in ran; h already reflects it

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self, h, self.masker)


def sparse_modules(model: nn.Module) -> list[_SparseModule]:
    """The installed sparse FFN modules, in layer order (empty if the model is dense)."""
    return sorted((m for m in model.modules() if isinstance(m, _SparseModule)), key=lambda m: m.layer_idx)


def install(
    model: nn.Module,
    sites: list[FFNSite],
    method: Method,
    maskers: list[Masker],
    predictors: list[dict[str, torch.Tensor]] | None = None,
) -> None:
    """Put a sparse module in place of every FFN site (all inputs must already be validated)."""
    for i, site in enumerate(sites):
        cls = SparseFFN if site.kind == "gated" else SparseActivation
        predictor = predictors[i] if predictors is not None else None
        module = cls(site, method, maskers[i], predictor)
        ref = next((p for p in model.parameters()), None)
        if ref is not None:
            module.to(ref.device)
        setattr(site.parent, site.name, module)


def remove(model: nn.Module) -> None:
    """Put the original FFN modules back; the model is dense again."""
    for module in sparse_modules(model):
        if isinstance(module, SparseActivation):
            module.remove_hook()
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if child is module:
                    setattr(parent, name, module.original[0])
