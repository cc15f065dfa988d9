"""Offloaded decode: a model larger than the GPU's memory, with only the FFN rows a token keeps moved.

`offload(model, device="cuda", gpu_budget="8GiB", frequencies=...)` keeps on ``device`` everything that
every token needs (attention, embeddings, norms, LM head, each sparse FFN's buffers: thresholds and
D-COUNTDOWN's predictors) plus each method's *densely computed* FFN matrix (W_up for M-COUNTDOWN, W_gate
for CATS; none for D-COUNTDOWN), then as many "hot" neurons as the budget allows. The other neurons' rows
(of the matrices the method reads only for kept neurons) live in host memory, pinned when the device is
a GPU. A neuron is one row per sparse matrix: ``[k, H]`` with W_down stored transposed, so one neuron is
one contiguous ``k·H`` block and a gather is one ``index_select`` over dim 0.

Per layer and decode step (one stream, so every hazard is ordered by construction):

1. the dense part (W_up x, act(W_gate x) or the predictor's logits) and the mask, exactly as the
   resident reference path computes them (``module.keep``: same thresholds, same ties);
2. the union of kept neurons over the step's tokens, split into resident and host neurons; the host
   neurons' positions come to the CPU (one device sync per layer);
3. resident kept rows are read in place; host kept rows are gathered by the CPU into pinned staging in
   chunks of ``block_rows`` and copied to a device staging buffer (two halves alternate, and a chunk's
   host half is only refilled after the event of its previous copy, so the CPU gathers chunk c+1 while
   the link carries chunk c);
4. the FFN output is the sum over kept neurons of ``t_i · W_down[:, i]``, in float32 per chunk.

With ``overlap=True`` (D-COUNTDOWN with lookahead predictors in use) steps 1–3 start earlier, at the
point the layer's predictor input exists (its attention input, or the previous layer's FFN input), on a
worker thread and a side CUDA stream, without the per-layer sync; the FFN waits only for the event of
its own rows (`countdown.overlap`).

A dense model (not sparsified) is offloaded as "dense streaming": every step moves its host rows whole,
in ``block_rows`` blocks straight from the pinned copy (the baseline against which the sparse routes are
measured). Multi-token forwards that the sparsity policy runs densely (prefill under
``positions="decode"``) are streamed the same way.

The original FFN parameters stay on the host (pageable, untouched) as the model's state of record, so
``state_dict()`` keys and values do not change and `unoffload` only moves the rest back; the offload's own
copies (device rows, pinned rows, staging) belong to the per-layer `LayerOffload` objects and are dropped
with them. `host_bytes_live()` counts the host buffers alive anywhere (a weak registry), which is how the
tests check that repeated offload/unoffload does not leak pinned memory on a machine without CUDA.

Not captured in CUDA graphs (the kept count changes every step): `countdown.generate` runs it eagerly.
"""

from __future__ import annotations

import re
import types
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import SparseFFN, sparse_modules
from .lookahead import lookahead_source
from .models import ffn_sites
from .overlap import RowPrefetcher

_ATTR = "_countdown_offload"  # on the model: the `ModelOffload`; on each FFN module: its `LayerOffload`
# which FFN matrices each method computes densely (resident in full) and which it reads per kept neuron
ROUTES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "dense": (None, ("gate", "up", "down")),
    "m-countdown": ("up", ("gate", "down")),
    "cats": ("gate", ("up", "down")),
    "d-countdown": (None, ("gate", "up", "down")),
}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_HOST_BUFFERS: "weakref.WeakSet[torch.Tensor]" = weakref.WeakSet()  # every host buffer an offload allocated


def parse_bytes(value: int | str) -> int:
    """``8589934592``, ``"8GiB"``, ``"512 MiB"``, ``"8GB"`` as a byte count (a clear error otherwise)."""
    if isinstance(value, bool):
        raise TypeError(f"a memory size must be bytes (int) or a string like '8GiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a memory size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"cannot read memory size {value!r}; write e.g. '8GiB', '512MiB', '8GB' or a byte count")


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1, e.g. ``"7.52 GiB"``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def host_bytes_live() -> int:
    """Bytes of the host buffers (pinned copies and staging) that offloads allocated and that are still
    alive: 0 once every offload is undone and collected."""
    return sum(t.numel() * t.element_size() for t in list(_HOST_BUFFERS))


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, pin_memory=pin)
    _HOST_BUFFERS.add(t)
    return t


@dataclass
class LinkStats:
    """What crossed the host-to-device link, and how often the kept neurons were already resident."""

    steps: int = 0  # sparse FFN calls (per layer)
    tokens: int = 0  # token positions served sparsely (per layer)
    kept: int = 0  # kept neurons, summed over tokens (per-token masks)
    kept_resident: int = 0  # of those, resident (hot) ones
    rows_moved: int = 0  # neuron rows copied host -> device (sparse gathers and dense streaming)
    rows_prefetched: int = 0  # of those, rows started early from a lookahead predictor (overlap=True)
    bytes_moved: int = 0

    def add(self, other: "LinkStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def hit_rate(self) -> float:
        """Fraction of kept neurons (per token) that were resident."""
        return self.kept_resident / self.kept if self.kept else float("nan")


@dataclass
class _Staging:
    """Two alternating halves of pinned host staging and device staging, ``rows`` neurons each."""

    host: list[torch.Tensor]
    device: list[torch.Tensor]
    events: list = field(default_factory=lambda: [None, None])

    @classmethod
    def make(cls, rows: int, k: int, hidden: int, dtype: torch.dtype, device: torch.device) -> "_Staging":
        pin = device.type == "cuda"
        return cls([_host_empty((rows, k, hidden), dtype, pin) for _ in range(2)],
                   [torch.empty(rows, k, hidden, dtype=dtype, device=device) for _ in range(2)])

    def send_gathered(self, half: int, source: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``source[positions]`` (host [n_host, k, H], positions a CPU LongTensor of n <= rows) on the device."""
        event = self.events[half]
        if event is not None:
            event.synchronize()  # the previous copy out of this host half has finished reading it
        n = positions.numel()
        host = self.host[half][:n]
        torch.index_select(source, 0, positions, out=host)
        return self._copy(half, host)

    def send_slice(self, half: int, rows: torch.Tensor) -> torch.Tensor:
        """A contiguous block of host rows (already pinned) on the device."""
        return self._copy(half, rows)

    def _copy(self, half: int, host: torch.Tensor) -> torch.Tensor:
        dst = self.device[half][: host.shape[0]]
        dst.copy_(host, non_blocking=dst.is_cuda)
        if dst.is_cuda:
            event = torch.cuda.Event()
            event.record()
            self.events[half] = event
        return dst


class LayerOffload:
    """One gated FFN split between the device (dense matrix, hot neurons) and the host (cold neurons)."""

    def __init__(self, module: nn.Module, route: str, weights: dict[str, torch.Tensor], act, hot: torch.Tensor,
                 device: torch.device, staging: _Staging):
        self.module = module
        self.route = route
        self.dense_name, self.sparse_names = ROUTES[route]
        self.act = act
        inter, hidden = weights["gate"].shape
        self.intermediate, self.hidden = inter, hidden
        hot = torch.unique(hot.long().cpu())
        is_hot = torch.zeros(inter, dtype=torch.bool)
        is_hot[hot] = True
        cold = (~is_hot).nonzero().flatten()
        slot = torch.empty(inter, dtype=torch.long)
        slot[hot] = torch.arange(hot.numel())
        slot[cold] = torch.arange(cold.numel())
        self.hot_ids, self.cold_ids = hot.to(device), cold.to(device)
        self.is_hot, self.slot = is_hot.to(device), slot.to(device)
        self.dense = weights[self.dense_name].to(device).contiguous() if self.dense_name else None
        rows = torch.stack([weights[n] for n in self.sparse_names], dim=1)  # [I, k, H] (down transposed)
        self.hot_rows = rows[hot].to(device)
        self.cold_rows = _host_empty(tuple(rows[cold].shape), rows.dtype, device.type == "cuda")
        self.cold_rows.copy_(rows[cold])
        self.staging = staging
        self.stats = LinkStats()
        self.prefetcher = None  # a `countdown.overlap.RowPrefetcher` when offloaded with overlap=True

    @property
    def row_bytes(self) -> int:
        return len(self.sparse_names) * self.hidden * self.hot_rows.element_size()

    def resident_bytes(self) -> int:
        dense = self.dense.numel() * self.dense.element_size() if self.dense is not None else 0
        index = sum(t.numel() * t.element_size() for t in (self.hot_ids, self.cold_ids, self.is_hot, self.slot))
        return dense + self.hot_rows.numel() * self.hot_rows.element_size() + index

    # -- the FFN --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if self.route == "dense" or not isinstance(module, SparseFFN):
            return self._dense(x)
        n_dense = module._dense_positions(x)
        if isinstance(n_dense, torch.Tensor):  # per-row sparse positions (lm-eval batches)
            out = x.new_empty(x.shape)
            out[n_dense] = self._sparse(x[n_dense])
            out[~n_dense] = self._dense(x[~n_dense])
            return out
        if n_dense == 0:
            return self._sparse(x)
        dense = self._dense(x[..., :n_dense, :])
        if n_dense == x.shape[-2]:
            return dense
        return torch.cat([dense, self._sparse(x[..., n_dense:, :])], dim=-2)

    def _dense_part(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.dense_name is None:
            return None
        a = F.linear(x, self.dense)
        return self.act(a) if self.dense_name == "gate" else a  # CATS keeps act(W_gate x), M-CD W_up x

    def _partial(self, x: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, dense: torch.Tensor | None,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Σ over neurons ``ids`` (rows [n, k, H] in ``sparse_names`` order) of t_i · W_down[:, i], fp32 [N, H]."""
        first = x @ rows[:, 0].t()
        if self.route == "m-countdown":
            t = self.act(first) * dense[:, ids]
        elif self.route == "cats":
            t = dense[:, ids] * first
        else:
            t = self.act(first) * (x @ rows[:, 1].t())
        if mask is not None:
            t = t * mask[:, ids]
        return t.float() @ rows[:, -1].float()

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron (prefill, dense streaming): resident rows in place, host rows whole in blocks."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        dense = self._dense_part(x)
        y = self._partial(x, self.hot_ids, self.hot_rows, dense, None)
        block = self.staging.device[0].shape[0]
        for c, start in enumerate(range(0, self.cold_rows.shape[0], block)):
            host = self.cold_rows[start : start + block]
            rows = self.staging.send_slice(c % 2, host)
            y += self._partial(x, self.cold_ids[start : start + block], rows, dense, None)
            self.stats.rows_moved += host.shape[0]
            self.stats.bytes_moved += host.shape[0] * self.row_bytes
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        """Kept neurons only: the method's mask as the resident path computes it, then kept rows."""
        module = self.module
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        taken = self.prefetcher.take(module.layer_idx, x.shape[0]) if self.prefetcher is not None else None
        if taken is not None:
            return self._prefetched(x, *taken).reshape(*shape[:-1], -1)
        dense = self._dense_part(x)
        if self.route == "d-countdown":
            score = module.predict(x)
        else:
            score = dense.abs()
        mask = module.keep("coef", score)
        kept_by_token = mask != 0
        kept = kept_by_token.any(0)
        hot_ids = (kept & self.is_hot).nonzero().flatten()
        cold_ids = (kept & ~self.is_hot).nonzero().flatten()
        y = self._partial(x, hot_ids, self.hot_rows[self.slot[hot_ids]], dense, mask)
        positions = self.slot[cold_ids].cpu()  # one sync per layer: the host gathers by these
        block = self.staging.device[0].shape[0]
        for c, start in enumerate(range(0, positions.numel(), block)):
            rows = self.staging.send_gathered(c % 2, self.cold_rows, positions[start : start + block])
            y += self._partial(x, cold_ids[start : start + block], rows, dense, mask)
        stats = self.stats
        stats.steps += 1
        stats.tokens += x.shape[0]
        stats.kept += int(kept_by_token.sum())
        stats.kept_resident += int((kept_by_token & self.is_hot).sum())
        stats.rows_moved += positions.numel()
        stats.bytes_moved += positions.numel() * self.row_bytes
        return y.to(x.dtype).reshape(*shape[:-1], -1)

    def _prefetched(self, x: torch.Tensor, got, mask: torch.Tensor, slot) -> torch.Tensor:
        """The sparse step from rows a lookahead predictor started early (`countdown.overlap`): the mask
        was computed at the hook, the kept sets split on the host, the rows are in ``slot``."""
        y = self._partial(x, got.hot_ids, self.hot_rows[self.slot[got.hot_ids]], None, mask)
        y += self._partial(x, got.cold_ids, got.rows, None, mask)
        self.prefetcher.consumed(slot)
        overflow = got.overflow_positions
        block = self.staging.device[0].shape[0]
        for c, start in enumerate(range(0, overflow.numel(), block)):  # beyond the slot: the inline chunks
            rows = self.staging.send_gathered(c % 2, self.cold_rows, overflow[start : start + block])
            ids = got.overflow_ids[start : start + block].to(x.device)
            y += self._partial(x, ids, rows, None, mask)
        moved = got.cold_ids.numel() + overflow.numel()
        stats = self.stats
        stats.steps += 1
        stats.tokens += x.shape[0]
        stats.kept += got.kept
        stats.kept_resident += got.kept_resident
        stats.rows_moved += moved
        stats.rows_prefetched += got.cold_ids.numel()
        stats.bytes_moved += moved * self.row_bytes
        return y.to(x.dtype)


def _offloaded_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.__dict__[_ATTR].forward(x)


@dataclass
class ModelOffload:
    """What `offload` did to a model: where its other tensors were, what is resident, the budget."""

    device: torch.device
    budget: int
    reserve: int
    block_rows: int
    route: str
    layers: list[LayerOffload]
    ffn_modules: list[nn.Module]
    home: torch.device  # where the rest of the model was before
    resident_bytes: int  # everything on the device that is not a hot neuron row, staging included
    hot_neurons: int
    host_embedding: nn.Module | None = None  # the input embedding, when it stays on the host
    prefetcher: RowPrefetcher | None = None  # overlap=True: lookahead rows started early on a side stream

    def stats(self) -> LinkStats:
        total = LinkStats()
        for layer in self.layers:
            total.add(layer.stats)
        return total

    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.stats = LinkStats()

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host_tensors())

    def _host_tensors(self) -> list[torch.Tensor]:
        out = [layer.cold_rows for layer in self.layers]
        if self.layers:
            out += self.layers[0].staging.host
        if self.prefetcher is not None:
            out += [t for slot in self.prefetcher.slots for t in (slot.host, slot.ids_host)]
        return out

    @property
    def overlap_note(self) -> str | None:
        """How the lookahead prefetch runs here (None: overlap off)."""
        return self.prefetcher.note if self.prefetcher is not None else None


def offload_state(model: nn.Module) -> ModelOffload | None:
    """The model's `ModelOffload`, or None when it is not offloaded."""
    return model.__dict__.get(_ATTR)


def _route(model: nn.Module) -> str:
    modules = sparse_modules(model)
    if not modules:
        return "dense"
    name = modules[0].method.name
    if name not in ROUTES or not all(isinstance(m, SparseFFN) for m in modules):
        raise ValueError(f"offload serves dense models and the methods {', '.join(r for r in ROUTES if r != 'dense')} "
                         f"on gated FFNs; this model is sparsified with {name!r}")
    if name == "d-countdown" and not all(m.has_predictor for m in modules):
        raise ValueError("d-countdown needs its predictors installed before offload")
    return name


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def offload(model: nn.Module, device: str | torch.device = "cuda", gpu_budget: int | str = "8GiB", *,
            frequencies: list[torch.Tensor] | None = None, reserve: int | str = "1GiB",
            block_rows: int = 1024, cache: bool = True, embeddings: str = "auto",
            overlap: bool = False) -> nn.Module:
    """Split ``model`` between ``device`` (within ``gpu_budget`` bytes) and host memory; returns the model.

    Call after `countdown.sparsify` (methods: m-countdown, cats, d-countdown; a dense model is offloaded
    as dense streaming). ``frequencies``: per layer, how often each neuron is kept ([I] each, e.g. from
    `countdown.hot.keep_frequencies` on calibration text); the budget left after the resident part goes to
    the most frequently kept neurons over all layers together (one neuron's rows cost the same bytes in
    every layer, so this maximises the expected resident hits per byte). None: no preference (the lowest
    neuron indices of every layer, in equal shares). ``reserve``: device memory kept free for the KV
    cache and activations. ``block_rows``: neurons per host-to-device copy (prefill / dense streaming
    blocks and sparse gather chunks; two device staging buffers of that many rows).
    ``embeddings``: "auto" keeps the input embedding table on the host when the LM head does not share
    it (a token reads one row of it: 1 GB of device memory saved on Llama-3-8B), "host" / "device" force.
    ``cache=False``: no hot neurons (every kept row crosses the link; the baseline of the hot-neuron cache).
    ``overlap=True`` (D-COUNTDOWN with lookahead predictors in use, `countdown.lookahead.use_lookahead`
    "attention" or "previous"): each layer's host rows are gathered by a worker thread and copied on a
    side CUDA stream from the point its predictor's input exists, while the attention (and the layer
    before) run; the FFN waits only for its own rows (`countdown.overlap`). Two more staging slots of
    ``2 * block_rows`` rows; off by default until measured faster.
    A budget below the resident part (`plan_resident`'s ``minimum``) raises a ValueError naming it."""
    if offload_state(model) is not None:
        raise ValueError("the model is already offloaded; call countdown.unoffload(model) first")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but this torch build sees no CUDA GPU")
    budget, reserve = parse_bytes(gpu_budget), parse_bytes(reserve)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be True or False, got {overlap!r}")
    plan = plan_resident(model, reserve=reserve, block_rows=block_rows, embeddings=embeddings, overlap=overlap)
    if overlap:
        _check_overlap(model, plan["route"])
    host_emb = plan["host_embedding"]
    route, others, minimum, row_bytes = plan["route"], plan["others"], plan["minimum"], plan["row_bytes"]
    sites = ffn_sites(model)
    if budget < minimum:
        raise ValueError(f"gpu_budget {format_bytes(budget)} is below the resident part of this model: "
                         f"{format_bytes(minimum)} minimum ({minimum} bytes: non-FFN weights and buffers "
                         f"{format_bytes(plan['model_bytes'])}, dense FFN part {format_bytes(plan['dense_bytes'])}, "
                         f"staging {format_bytes(plan['staging_bytes'])}, reserve {format_bytes(reserve)})")
    inter, hidden = sites[0].intermediate_size, sites[0].hidden_size
    dtype = sites[0].gated_weights()[0].dtype
    k = len(ROUTES[route][1])
    ffn_modules = [site.module for site in sites]
    n_hot = min((budget - minimum) // row_bytes, len(sites) * inter) if cache else 0
    hot = hot_sets(frequencies, len(sites), inter, int(n_hot))
    home = others[0].device if others else torch.device("cpu")  # (the offload's own device copies aside)
    with torch.no_grad():
        for p in others:  # the model's own tensors move; FFN projections stay on (or go to) the host
            p.data = p.data.to(device)
        host_modules = set(host_emb.modules()) if host_emb is not None else set()
        for m in model.modules():
            for name, buf in list(m._buffers.items()):
                if buf is not None and m not in host_modules:
                    m._buffers[name] = buf.to(device)
        if host_emb is not None:
            host_emb.to("cpu")
            host_emb.__dict__[_ATTR] = device
            host_emb.forward = types.MethodType(_embedding_forward, host_emb)
        for m in ffn_modules:
            for proj in site_projections(m):
                for p in proj.parameters():
                    p.data = p.data.cpu()
        staging = _Staging.make(block_rows, k, hidden, dtype, device)
        layers = []
        for site, m, hot_l in zip(ffn_sites(model), ffn_modules, hot):
            w_gate, w_up, w_down = site.gated_weights()
            weights = {"gate": w_gate.detach(), "up": w_up.detach(), "down": w_down.detach().t()}
            layer = LayerOffload(m, route, weights, site.act, hot_l, device, staging)
            m.__dict__[_ATTR] = layer
            m.forward = types.MethodType(_offloaded_forward, m)
            layers.append(layer)
        prefetcher = None
        if overlap:
            prefetcher = RowPrefetcher(model, layers, device, overlap_rows(block_rows), _host_empty)
            for layer in layers:
                layer.prefetcher = prefetcher
    state = ModelOffload(device, budget, reserve, block_rows, route, layers, ffn_modules, home,
                         minimum - reserve, int(n_hot), host_emb, prefetcher)
    model.__dict__[_ATTR] = state
    return model


def overlap_rows(block_rows: int) -> int:
    """Rows one prefetch slot holds: twice a copy block (1024 → 2048, room for a Llama-3-8B layer's
    1434 kept neurons at 90% sparsity before any hot hit); the rest goes through the inline chunks."""
    return 2 * block_rows


def _check_overlap(model: nn.Module, route: str) -> None:
    """overlap=True needs rows known before the FFN: D-COUNTDOWN with lookahead predictors in use."""
    if route != "d-countdown":
        raise ValueError(f"overlap=True serves d-countdown with lookahead predictors; this model is {route!r}, "
                         "whose kept set is known only from the FFN's own input (nothing to start early)")
    source = lookahead_source(model)
    if source not in ("attention", "previous"):
        raise ValueError("overlap=True needs lookahead predictors in use: call countdown.lookahead.use_lookahead("
                         "model, 'attention' or 'previous') with predictors from train_lookahead before offload "
                         f"(in use: {source!r})")


def _host_embedding(model: nn.Module, embeddings: str) -> nn.Module | None:
    """The input embedding module when it stays on the host (``"host"``; ``"auto"``: when the LM head does
    not share its weight, since a token reads one row of it), else None."""
    if embeddings not in ("auto", "host", "device"):
        raise ValueError(f"embeddings must be 'auto', 'host' or 'device', got {embeddings!r}")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    if embeddings == "host" and tied:
        raise ValueError("the LM head shares the input embedding's weight, so the embedding must stay on the device")
    return emb if embeddings == "host" or (embeddings == "auto" and not tied) else None


def _embedding_forward(self: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A host-resident input embedding: look the rows up where the table is, hand them to the device."""
    return type(self).forward(self, ids.to(self.weight.device)).to(self.__dict__[_ATTR])


def plan_resident(model: nn.Module, *, reserve: int | str = "1GiB", block_rows: int = 1024,
                  embeddings: str = "auto", overlap: bool = False) -> dict:
    """What `offload` must keep on the device before any hot neuron, in bytes: ``minimum`` (the smallest
    ``gpu_budget``: model tensors other than the FFN projections, each method's dense FFN matrix, the
    staging buffers (with ``overlap``, the two prefetch slots too), the per-neuron index and ``reserve``), its parts, ``row_bytes`` (one neuron's rows
    of the sparse matrices), ``host_rows`` (neurons in all) and the ``route``."""
    reserve = parse_bytes(reserve)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
    route = _route(model)
    sites = ffn_sites(model)
    if any(site.kind != "gated" for site in sites):
        raise ValueError("offload serves gated FFNs (Llama, Mistral, Qwen, Gemma, Phi-3); this model's FFN is plain")
    ffn_modules = [site.module for site in sites]
    for m in ffn_modules:
        if any(getattr(p, "bias", None) is not None for p in site_projections(m)):
            raise ValueError("offload does not serve FFN projections with biases")
    ffn_params = {id(p) for m in ffn_modules for proj in site_projections(m) for p in proj.parameters()}
    host_emb = _host_embedding(model, embeddings)
    if host_emb is not None:
        ffn_params |= {id(p) for p in host_emb.parameters()}
    others = [p for p in model.parameters() if id(p) not in ffn_params]
    inter, hidden = sites[0].intermediate_size, sites[0].hidden_size
    element = sites[0].gated_weights()[0].element_size()
    dense_name, sparse_names = ROUTES[route]
    row_bytes = len(sparse_names) * hidden * element
    staging_bytes = 2 * block_rows * row_bytes
    if overlap:  # two prefetch slots: rows and their neuron ids
        staging_bytes += 2 * overlap_rows(block_rows) * row_bytes + 2 * inter * 8
    dense_bytes = len(sites) * inter * hidden * element if dense_name else 0
    model_bytes = _tensor_bytes(others) + _tensor_bytes(model.buffers())  # (a host embedding's buffers too)
    index_bytes = len(sites) * inter * (8 + 8 + 1)  # ids, slots, is_hot per neuron
    minimum = model_bytes + dense_bytes + staging_bytes + index_bytes + reserve
    return {"route": route, "others": others, "minimum": minimum, "model_bytes": model_bytes,
            "dense_bytes": dense_bytes, "staging_bytes": staging_bytes, "index_bytes": index_bytes,
            "row_bytes": row_bytes, "host_rows": len(sites) * inter, "host_embedding": host_emb}


def site_projections(module: nn.Module) -> list[nn.Module]:
    """The projection modules of a gated FFN module (original MLP or SparseFFN)."""
    names = ("gate_up_proj", "down_proj") if hasattr(module, "gate_up_proj") else ("gate_proj", "up_proj", "down_proj")
    return [getattr(module, n) for n in names]


def unoffload(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """Undo `offload`: the FFN modules run their own forward again and every tensor goes to ``device``
    (default: where the model's non-FFN tensors were before `offload`). The offload's copies are dropped."""
    state = offload_state(model)
    if state is None:
        raise ValueError("the model is not offloaded")
    target = torch.device(device) if device is not None else state.home
    with torch.no_grad():
        for m in [*state.ffn_modules, *([state.host_embedding] if state.host_embedding is not None else [])]:
            m.__dict__.pop(_ATTR, None)
            m.__dict__.pop("forward", None)
        for p in model.parameters():
            p.data = p.data.to(target)
        for m in model.modules():
            for name, buf in list(m._buffers.items()):
                if buf is not None:
                    m._buffers[name] = buf.to(target)
    if state.prefetcher is not None:
        state.prefetcher.close()
    for layer in state.layers:  # drop the references held by the objects themselves too
        layer.module = None
        layer.prefetcher = None
    del model.__dict__[_ATTR]
    return model


def hot_sets(frequencies: list[torch.Tensor] | None, layers: int, inter: int, n_hot: int) -> list[torch.Tensor]:
    """Per layer, the resident neuron ids: the ``n_hot`` most frequently kept over all layers (ties and
    ``frequencies=None``: equal shares of the lowest indices)."""
    if frequencies is None:
        share = [n_hot // layers + (1 if i < n_hot % layers else 0) for i in range(layers)]
        return [torch.arange(min(s, inter)) for s in share]
    if len(frequencies) != layers or any(f.numel() != inter for f in frequencies):
        raise ValueError(f"frequencies must be {layers} tensors of {inter} values (one per neuron of each layer)")
    flat = torch.stack([f.float().cpu() for f in frequencies]).flatten()
    top = flat.topk(n_hot).indices if n_hot else flat.new_empty(0, dtype=torch.long)
    layer_of, neuron = top // inter, top % inter
    return [neuron[layer_of == i] for i in range(layers)]
