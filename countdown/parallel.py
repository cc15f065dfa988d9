"""Sparse FFNs on a tensor-parallel model (Megatron layout, ``torch.distributed``).

A tensor-parallel gated FFN shards W_gate and W_up by rows (column-wise linear) and W_down by columns
(row-wise linear), all along the intermediate dimension I: rank ``r`` of ``n`` owns the neurons
``[r I/n, (r+1) I/n)``. Every mask rule countdown serves under TP compares a neuron's own score with a
per-layer threshold, so each rank masks its own slice with the *global* thresholds (the same value on
every rank) and nothing new is communicated: the one all-reduce after W_down is the one dense TP does.

The engine that shards the model is transformers' (``from_pretrained(..., tp_plan="auto")`` under
torchrun) or `shard_model` here (torch's ``parallelize_module`` with the model's own TP plan, for models
built from a config, on the meta device for large ones). Both leave every sharded weight a ``DTensor``
(placements ``Shard(0)`` for gate/up, ``Shard(1)`` for down) and make the projection modules take and
return local tensors, so `countdown.ffn.SparseFFN`'s reference path runs unchanged; its kernel path
reads the local shards (`local`) and adds the all-reduce itself (`all_reduce`).

What differs from one process:

* top-k mode is refused: a per-token top-k over all I neurons needs every rank's scores;
* calibration and predictor training are refused: run them on the unsharded model (one GPU), save the
  artifact, load it on every rank (`countdown.load_sparsity`), or pass the `Calibration` and
  `Predictors` objects to `countdown.sparsify`. Per-neuron tensors (predictor ``U`` rows and ``b``,
  statistics) are cut to the rank's slice on install (`local_layers`) and gathered back on save
  (`full_layers`), so an artifact saved on a sharded model loads on the unsharded one and back;
* `countdown.fingerprint` reads the first rows of W_gate from the rank that owns them (a broadcast), so
  the sharded model has the unsharded model's fingerprint. Every rank must call the functions that
  fingerprint or save (`sparsify`, `load_sparsity`, `save_sparsity`): they communicate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

# methods whose scores and masks are per-neuron and read no whole-matrix constant (column norms, SVD):
# under TP each rank computes exactly its slice of what one process computes
TP_METHODS = ("dense", "cats", "m-countdown", "d-countdown-ideal", "d-countdown", "teal", "chess")
# per-neuron predictor tensors (rows along I: low-rank U, bitlinear W, bias b); "V" [H, r] is the same on every rank
PREDICTOR_ROWS = ("U", "W", "b")


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded weight (a plain tensor, the storage the kernels read); ``t`` itself
    when it is not sharded."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class FFNShard:
    """Which intermediate neurons ``[start, stop)`` of ``size`` this rank's FFN owns, and its TP group."""

    group: object  # torch.distributed ProcessGroup
    rank: int  # in the group
    world: int
    start: int
    stop: int
    size: int  # global I


def _placement_dim(w: torch.Tensor) -> int | None:
    from torch.distributed.tensor import Shard

    if w.device_mesh.ndim != 1 or len(w.placements) != 1 or not isinstance(w.placements[0], Shard):
        return None
    return w.placements[0].dim % w.dim()


def ffn_shard(site) -> FFNShard | None:
    """The TP shard of one `countdown.models.FFNSite` (None when its weights are not sharded), or a
    clear error for a layout countdown cannot mask locally."""
    weights = {name: m.weight for name, m in site.modules.items()}
    sharded = {name for name, w in weights.items() if is_sharded(w)}
    if not sharded:
        return None
    where = f"layer {site.layer}"
    if site.kind != "gated" or "gate_up_proj" in weights:
        raise ValueError(f"{where}: tensor-parallel sparsity supports gated FFNs with separate gate_proj/up_proj "
                         "(Llama, Mistral, Qwen, Gemma); this FFN is plain or fused")
    if sharded != set(weights):
        raise ValueError(f"{where}: only {sorted(sharded)} are sharded; gate_proj, up_proj and down_proj must all be")
    want = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}
    for name, dim in want.items():
        if _placement_dim(weights[name]) != dim:
            raise ValueError(f"{where}: {name}.weight has placements {weights[name].placements} on a "
                             f"{weights[name].device_mesh.ndim}-D mesh; countdown needs the Megatron layout "
                             "(gate/up Shard(0), down Shard(1)) on a 1-D tensor-parallel mesh")
    w = weights["gate_proj"]
    mesh = w.device_mesh
    world, rank, size = mesh.size(), mesh.get_local_rank(), w.shape[0]
    if size % world:
        raise ValueError(f"{where}: intermediate size {size} does not divide by the TP size {world}")
    step = size // world
    if local(w).shape[0] != step or local(weights["down_proj"]).shape[1] != step:
        raise ValueError(f"{where}: local shards are not the even split of {size} neurons over {world} ranks")
    return FFNShard(mesh.get_group(), rank, world, rank * step, (rank + 1) * step, size)


def check(sites: list, method, mode: str) -> list[FFNShard | None]:
    """Every site's shard, after refusing what TP cannot serve exactly (all None on an unsharded model)."""
    shards = [ffn_shard(site) for site in sites]
    if not any(shards):
        return shards
    if not all(shards):
        raise ValueError("some FFNs are tensor-parallel and some are not: shard every decoder layer the same way")
    if mode == "topk":
        raise ValueError("mode='topk' is not supported on a tensor-parallel model: a per-token top-k over all I "
                         "neurons needs every rank's scores. Use threshold mode: calibrate on the unsharded model "
                         "(countdown.calibrate, or sparsify + save_sparsity on one GPU) and load the artifact on "
                         "every rank with countdown.load_sparsity")
    if method.name not in TP_METHODS:
        raise ValueError(f"method {method.name!r} is not supported on a tensor-parallel model (its scores read "
                         f"whole-matrix constants); methods served under TP: {', '.join(TP_METHODS)}")
    return shards


def refuse_sharded(sites: list, what: str) -> None:
    """A clear error for passes that need the whole model's scores (calibration, predictor training)."""
    if any(is_sharded(w.weight) for site in sites for w in site.modules.values()):
        raise ValueError(f"{what} on a tensor-parallel model is not supported: run it on the unsharded model "
                         "(one process), save the artifact, and load it on every rank (countdown.load_sparsity), "
                         "or pass the Calibration / Predictors objects to countdown.sparsify")


def _rows(t: torch.Tensor, shard: FFNShard, what: str) -> torch.Tensor:
    if t.shape[0] != shard.size:
        raise ValueError(f"{what} has {t.shape[0]} rows, the model's FFN has {shard.size} neurons")
    return t[shard.start : shard.stop]


def local_layers(layers: list[dict[str, torch.Tensor]] | None, shards: list[FFNShard | None],
                 keys: tuple[str, ...] | None) -> list[dict[str, torch.Tensor]] | None:
    """Per-layer tensors cut to each rank's neurons: the ``keys`` entries (None: every entry) by rows."""
    if layers is None or not any(shards):
        return layers
    return [{k: _rows(v, s, f"layer {i} {k}") if keys is None or k in keys else v for k, v in layer.items()}
            for i, (layer, s) in enumerate(zip(layers, shards))]


def gather_rows(t: torch.Tensor, shard: FFNShard | None) -> torch.Tensor:
    """The whole ``[I, ...]`` tensor from every rank's ``[I/n, ...]`` slice (a collective)."""
    if shard is None:
        return t
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.contiguous(), group=shard.group)
    return torch.cat(parts)


def full_layers(layers: list[dict[str, torch.Tensor]], shards: list[FFNShard | None],
                keys: tuple[str, ...] | None) -> list[dict[str, torch.Tensor]]:
    """The inverse of `local_layers` (a collective)."""
    return [{k: gather_rows(v, s) if keys is None or k in keys else v for k, v in layer.items()}
            for layer, s in zip(layers, shards)]


def all_reduce(out: torch.Tensor, shard: FFNShard | None) -> torch.Tensor:
    """Sum the ranks' partial FFN outputs (what the row-wise W_down's own forward does after its GEMM)."""
    if shard is not None:
        dist.all_reduce(out, group=shard.group)
    return out


def relayout(w: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` applied to a weight's local storage; a sharded weight stays sharded as before."""
    if not is_sharded(w):
        return fn(w)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(fn(w.to_local()), w.device_mesh, w.placements, run_check=False,
                              shape=w.shape, stride=w.stride())


def leading_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of a weight [I, H], also when it is sharded by rows (rank 0 of the mesh owns
    them and broadcasts: a collective)."""
    if not is_sharded(w):
        return w[:n].detach()
    if _placement_dim(w) != 0:
        return w[:n].detach().full_tensor()  # pragma: no cover - countdown's layouts shard W_gate by rows
    mesh = w.device_mesh
    group = mesh.get_group()
    mine = w.to_local().detach()
    buf = mine[:n].clone() if mesh.get_local_rank() == 0 else mine.new_empty((n, *mine.shape[1:]))
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf


def is_writer() -> bool:
    """Whether this process writes shared files (global rank 0, or no process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# -- sharding a model that was built in this process -----------------------------------------------

def shard_model(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model`` (a transformers causal LM with a ``base_model_tp_plan``) over the 1-D device mesh
    ``mesh`` (default: every process of the default group, on the model's device type) with torch's
    ``parallelize_module``: the plan's "colwise" modules column-wise, "rowwise" row-wise, each taking
    and returning local tensors (what transformers' own TP does). Works on a model on the meta device
    (then ``model.to_empty(device=...)`` materialises each rank's shards only). Attention reshapes with
    ``-1`` heads, so each rank runs its ``heads / n`` query and KV heads; embeddings, norms and the LM
    head stay replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if mesh is None:
        ref = next(model.parameters())
        kind = "cuda" if ref.device.type in ("cuda", "meta") and torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(kind, (dist.get_world_size(),))
    plan = getattr(model.config, "base_model_tp_plan", None) or {}
    if not plan:
        raise ValueError(f"{type(model).__name__}'s config has no base_model_tp_plan to shard by")
    world = mesh.size()
    cfg = model.config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(cfg, name, None)
        if value is not None and value % world:
            raise ValueError(f"{name}={value} does not divide by the TP size {world}")
    styles = {"colwise": lambda: ColwiseParallel(use_local_output=True),
              "rowwise": lambda: RowwiseParallel(use_local_output=True)}
    base = model.base_model
    torch_plan = {}
    for pattern, style in plan.items():
        if style not in styles:
            raise ValueError(f"TP style {style!r} of {pattern!r} is not one shard_model applies (colwise, rowwise)")
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        for name, _ in base.named_modules():
            if regex.fullmatch(name):
                torch_plan[name] = styles[style]()
    parallelize_module(base, mesh, torch_plan)
    return model
