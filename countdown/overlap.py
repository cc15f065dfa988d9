"""Lookahead row prefetch for offloaded decode (`countdown.offload(..., overlap=True)`).

With D-COUNTDOWN lookahead predictors in use (`countdown.lookahead.use_lookahead`), layer l's kept
neurons are known before layer l's FFN starts: at layer l's attention input (source "attention"), or
at layer l−1's FFN input (source "previous", DejaVu's). A `RowPrefetcher` hooks that point and starts
the host part of layer l's FFN on its way there, instead of at the FFN:

1. main thread, at the hook: the predictor's logits and the method's mask for the step's tokens
   (``module.keep``: the same thresholds / top-k as the inline path), and a non-blocking copy of the
   per-token kept mask [N, I] into pinned host memory, followed by an event;
2. a worker thread waits for that event (not for the rest of the queue), splits the kept neurons into
   resident and host ones on the CPU, gathers the host rows into the slot's pinned staging in chunks and
   copies each chunk on a side CUDA stream as soon as it is gathered (after the event that says the
   slot's previous rows were consumed), then records a "copied" event. The main thread has gone on
   queueing the attention (and, for "previous", layer l−1's FFN) meanwhile;
3. main thread, at layer l's FFN: it takes the worker's result, makes the compute stream wait for the
   "copied" event (for its own rows only), sums the kept neurons' contributions, and records a
   "consumed" event for the slot. Host rows beyond a slot's capacity take the inline path's chunks.

Two slots (layer parity): layer l+1's rows can be in flight while layer l's are read. No device sync
happens on the prefetched path. Multi-token forwards that run densely (prefill under
``positions="decode"``) and per-row position masks (lm-eval batches) are not prefetched: the inline
path serves them. On a CPU "device" there is no stream: the same worker, gathers and (plain) copies
run, so the index logic and its results are those of the GPU path without the overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .lookahead import attention_norms, lookahead_source
from .models import ffn_sites

CHUNK_ROWS = 256  # rows gathered per copy: the link starts on a layer's rows before its gather ends


@dataclass
class Prefetched:
    """What the worker hands the FFN for one layer and step (ids on the device, rows in the slot)."""

    hot_ids: torch.Tensor  # [n_hot] kept resident neurons (device)
    cold_ids: torch.Tensor  # [n] kept host neurons whose rows are in ``rows`` (device)
    rows: torch.Tensor  # [n, k, H] their rows, in the slot's device staging
    overflow_ids: torch.Tensor  # [m] kept host neurons beyond the slot's capacity (CPU)
    overflow_positions: torch.Tensor  # [m] their positions in the layer's host rows (CPU)
    copied: object  # torch.cuda.Event on the side stream, or None on the CPU
    kept: int  # kept neurons summed over tokens
    kept_resident: int


class _Slot:
    """Pinned host and device staging for one layer's prefetched rows, ids and mask."""

    def __init__(self, rows: int, k: int, hidden: int, inter: int, dtype: torch.dtype, device: torch.device,
                 host_empty: Callable[..., torch.Tensor]):
        pin = device.type == "cuda"
        self.pin, self.inter, self.host_empty = pin, inter, host_empty
        self.host = host_empty((rows, k, hidden), dtype, pin)
        self.device = torch.empty(rows, k, hidden, dtype=dtype, device=device)
        self.ids_host = host_empty((inter,), torch.long, pin)  # hot ids then cold ids (disjoint: <= I)
        self.ids_device = torch.empty(inter, dtype=torch.long, device=device)
        self.mask_host: torch.Tensor | None = None  # [N, I] bool, sized on first use
        self.copied = None  # the last copy into this slot (side stream)
        self.consumed = None  # the last read of this slot's device rows (compute stream)
        self.job: Future | None = None

    @property
    def capacity(self) -> int:
        return self.host.shape[0]

    def mask_buffer(self, tokens: int) -> torch.Tensor:
        if self.mask_host is None or self.mask_host.shape[0] != tokens:
            self.mask_host = self.host_empty((tokens, self.inter), torch.bool, self.pin)
        return self.mask_host


@dataclass
class _Pending:
    job: Future
    mask: torch.Tensor  # [N, I] the method's mask (device), for the FFN's sum
    tokens: int
    slot: _Slot


class RowPrefetcher:
    """Hooks that start each layer's host rows on their way from its lookahead predictor's input.

    ``layers``: the `countdown.offload.LayerOffload` of every layer (their ``module`` is the sparse
    FFN); ``host_empty(shape, dtype, pin)``: how host buffers are allocated (offload's registry)."""

    def __init__(self, model: nn.Module, layers: list, device: torch.device, rows: int,
                 host_empty: Callable[..., torch.Tensor]):
        source = lookahead_source(model)
        if source not in ("attention", "previous"):
            raise ValueError(
                "overlap=True needs D-COUNTDOWN lookahead predictors in use: call "
                "countdown.lookahead.use_lookahead(model, 'attention' or 'previous') before offload "
                f"(found {'none' if source is None else repr(source)}; an in-place predictor's rows are "
                "known only when the FFN starts, so there is nothing to overlap)")
        self.model, self.source, self.layers, self.device = model, source, layers, device
        first = layers[0]
        k = len(first.sparse_names)
        dtype = first.hot_rows.dtype
        self.slots = [_Slot(rows, k, first.hidden, first.intermediate, dtype, device, host_empty) for _ in range(2)]
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.note = ("side CUDA stream + worker thread: host rows gathered and copied while earlier layers run"
                     if self.stream is not None else
                     "CPU device: no side stream, copies are plain copies (same rows and results, no overlap)")
        self.pending: dict[int, _Pending] = {}
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="countdown-prefetch")
        self.is_hot_cpu = [layer.is_hot.cpu() for layer in layers]
        self.slot_cpu = [layer.slot.cpu() for layer in layers]
        sites = ffn_sites(model)
        self.handles = []
        norms = attention_norms(model, sites)
        if source == "attention":
            for i, norm in enumerate(norms):
                self.handles.append(norm.register_forward_hook(self._after_norm(i)))
        else:
            self.handles.append(norms[0].register_forward_hook(self._after_norm(0)))
            for i, site in enumerate(sites[:-1]):
                self.handles.append(site.input_module.register_forward_pre_hook(self._before_ffn(i + 1)))

    # -- hooks (main thread) ------------------------------------------------------------------------------
    def _after_norm(self, layer: int):
        def hook(module, args, out):
            self.start(layer, out)
        return hook

    def _before_ffn(self, layer: int):
        def hook(module, args):
            self.start(layer, args[0])
        return hook

    @torch.no_grad()
    def start(self, layer: int, early: torch.Tensor) -> None:
        """Predict layer ``layer``'s kept set from ``early`` ([..., T, H]) and start its host rows."""
        self.pending.pop(layer, None)
        if lookahead_source(self.model) != self.source:  # lookahead removed since: the inline path serves
            return
        lo = self.layers[layer]
        module = lo.module
        if module is None:
            return
        n_dense = module._dense_positions(early)
        if isinstance(n_dense, torch.Tensor) or n_dense != 0:  # per-row masks (lm-eval) / dense prefill: inline
            return
        x = early.reshape(-1, early.shape[-1])
        mask = module.keep("coef", type(module).predict(module, x))  # the installed predictor, on the early input
        slot = self.slots[layer % 2]
        if slot.job is not None:  # a job nobody took (an aborted forward): let it finish with its buffers
            slot.job.result()
        host_mask = slot.mask_buffer(x.shape[0])
        host_mask.copy_(mask != 0, non_blocking=self.stream is not None)
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        slot.job = self.worker.submit(self._gather, layer, slot, host_mask, ready)
        self.pending[layer] = _Pending(slot.job, mask, x.shape[0], slot)

    # -- worker thread ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _gather(self, layer: int, slot: _Slot, host_mask: torch.Tensor, ready) -> Prefetched:
        if ready is not None:
            ready.synchronize()
        lo = self.layers[layer]
        is_hot = self.is_hot_cpu[layer]
        kept = host_mask.any(0)
        hot_ids = (kept & is_hot).nonzero().flatten()
        cold_ids = (kept & ~is_hot).nonzero().flatten()
        positions = self.slot_cpu[layer][cold_ids]
        n = min(positions.numel(), slot.capacity)
        if slot.copied is not None:
            slot.copied.synchronize()  # the previous copy out of this slot's pinned staging has finished
        n_hot = hot_ids.numel()
        slot.ids_host[:n_hot] = hot_ids
        slot.ids_host[n_hot : n_hot + n] = cold_ids[:n]
        stream = self.stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None and slot.consumed is not None:
                stream.wait_event(slot.consumed)  # the FFN that read this slot's device rows has run
            ids = slot.ids_device[: n_hot + n]
            ids.copy_(slot.ids_host[: n_hot + n], non_blocking=stream is not None)
            for start in range(0, n, CHUNK_ROWS):
                end = min(n, start + CHUNK_ROWS)
                torch.index_select(lo.cold_rows, 0, positions[start:end], out=slot.host[start:end])
                slot.device[start:end].copy_(slot.host[start:end], non_blocking=stream is not None)
            copied = None
            if stream is not None:
                copied = torch.cuda.Event()
                copied.record(stream)
                slot.copied = copied
        kept_total = int(host_mask.sum())
        kept_resident = int((host_mask & is_hot).sum())
        return Prefetched(ids[:n_hot], ids[n_hot:], slot.device[:n], cold_ids[n:], positions[n:], copied,
                          kept_total, kept_resident)

    # -- the FFN (main thread) ----------------------------------------------------------------------------
    def take(self, layer: int, tokens: int) -> tuple[Prefetched, torch.Tensor, _Slot] | None:
        """The prefetched rows of ``layer`` for a sparse forward of ``tokens`` positions, with the compute
        stream made to wait for them; None when this forward was not prefetched."""
        pending = self.pending.pop(layer, None)
        if pending is None:
            return None
        result = pending.job.result()
        if pending.slot.job is pending.job:
            pending.slot.job = None
        if pending.tokens != tokens:
            return None
        if result.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(result.copied)
        return result, pending.mask, pending.slot

    def consumed(self, slot: _Slot) -> None:
        """The FFN's reads of ``slot``'s device rows are queued: the next copy into it waits for them."""
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record()
            slot.consumed = event

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for slot in self.slots:
            if slot.job is not None:
                slot.job.result()
        self.worker.shutdown(wait=True)
        self.pending.clear()
        self.slots = []

