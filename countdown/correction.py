"""Sirius-style correction: sparse decode steps checked every k tokens by one dense forward.

Sirius (Zhou et al., NeurIPS 2024, github.com/Infini-AI-Lab/Sirius) decodes with the contextually
sparse model and, every ``k`` tokens, lets the full model look at what it wrote in one parallel
forward. Here, with ``t0`` the last token the dense model chose (after prefill or a correction) at
cache slot ``p``:

1. ``k`` sparse decode steps feed ``t0 .. t(k-1)`` at slots ``p .. p+k-1`` and draft ``t1 .. tk``;
2. one dense forward over the ``k + 1`` tokens ``t0 .. tk`` at slots ``p .. p+k`` (the cache's write
   counters rewound to ``p`` first) rewrites their KV entries with the dense model's and gives the
   dense logits ``z_0 .. z_k`` (``z_i`` predicts slot ``p+i+1``);
3. the drafts are accepted up to the first rejected one, ``t(j+1)``; the dense model's token
   ``argmax z_j`` replaces it (all ``k`` accepted: ``argmax z_k`` is a bonus token), the cache
   counters and positions are set to the slot after it, and decoding goes on from step 1.

So each dense forward commits ``j + 1`` tokens (1 to ``k + 1``); every committed token was either
checked by or chosen by the dense model over a KV cache the dense model wrote. In a batch, rows roll
back together to the smallest ``j`` of the unfinished rows (the slots are shared); a row that
accepted more gets the dense model's token at that slot instead of its own draft.

Acceptance rules (`Acceptance`):

* ``"strict"``: a draft is accepted iff it is the dense model's greedy token (``t(i+1) ==
  argmax z_i``). The output is the dense model's greedy output (tested on a tiny model and SmolLM2).
* ``"relaxed"``: Sirius's likelihood rule: accept iff the dense model's probability of the draft,
  at temperature ``T``, reaches a threshold: ``softmax(z_i / T)[t(i+1)] >= threshold``. The authors'
  scripts use ``T = 0.6`` and ``threshold = 0.1`` (``Miscellaneous/llama12_static_cache_sdpa_with_check3.py``:
  ``softmax(logits / 0.6)``, ``selected_likelihood >= config.thr``, ``thr=0.1`` in their README);
  those are the defaults. One addition: the dense model's greedy token is always accepted (Sirius's
  rule alone rejects it where the tempered dense distribution is flat, then puts the same token back
  and throws away the drafts after it), so relaxed accepts everything strict does. The output may
  leave the dense model's greedy path wherever the dense model found the sparse choice likely enough.

Greedy decoding only. On CUDA the ``k + 1``-token dense forward is captured as a CUDA graph
(as the decode step is, `countdown.decode`); on the CPU it runs eagerly, as the step does. The dense
forward is dense because sparse FFNs and attention projections run every multi-token forward densely
under ``positions="decode"`` (what serves generation; a model sparsified with ``positions="all"`` is
refused). The host reads the device once per round (how many tokens were accepted, whether every
row has finished).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("strict", "relaxed")
MAX_EVERY = 64  # a longer window wastes most of a round at the first rejection


@dataclass(frozen=True)
class Acceptance:
    """How the dense forward judges a sparse draft (module docstring): ``"strict"`` (greedy-equal) or
    ``"relaxed"`` (dense probability at ``temperature`` >= ``threshold``, Sirius's rule)."""

    rule: str = "strict"
    threshold: float = 0.1
    temperature: float = 0.6

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"acceptance rule must be one of {RULES}, got {self.rule!r}")
        for name in ("threshold", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability, from 0 to 1; got {self.threshold}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class Correction:
    """Correct every ``every`` sparse tokens with one dense forward of ``every + 1`` tokens."""

    every: int
    acceptance: Acceptance = Acceptance()


def resolve(correct_every: int | None, accept: str | Acceptance, do_sample: bool) -> Correction | None:
    """The `Correction` of a generate call's ``correct_every`` / ``accept`` arguments (None: off)."""
    if isinstance(accept, str):
        accept = Acceptance(accept)
    elif not isinstance(accept, Acceptance):
        raise TypeError(f"accept must be 'strict', 'relaxed' or an Acceptance, got {type(accept).__name__}")
    if correct_every is None:
        return None
    if isinstance(correct_every, bool) or not isinstance(correct_every, int) or not 1 <= correct_every <= MAX_EVERY:
        raise ValueError(f"correct_every must be an int from 1 to {MAX_EVERY} (sparse steps per dense check), "
                         f"got {correct_every!r}")
    if do_sample:
        raise ValueError("correct_every works with greedy decoding only (do_sample=False): the acceptance rules "
                         "judge greedy drafts")
    return Correction(correct_every, accept)


def check_model(decoder) -> None:
    """Refuse what the rewind cannot serve: a model whose multi-token forwards are sparse, or a
    sliding-window cache layer shorter than the decoder's cache (it shifts instead of rewinding)."""
    from .ffn import sparsity_spec

    spec = sparsity_spec(decoder.model)
    if spec is not None and spec.positions == "all":
        raise ValueError("correction verifies with the dense model, but this model was sparsified with "
                         "positions='all', which makes the verification forward sparse too; sparsify with "
                         "positions='decode' (the default)")
    for layer in decoder.cache.layers:
        if getattr(layer, "is_sliding", False) and layer.max_cache_len < decoder.max_len:
            raise ValueError(f"correction rewinds the KV cache, but a sliding-window layer keeps only "
                             f"{layer.max_cache_len} of the {decoder.max_len} slots (it shifts when full); "
                             f"use a cache of at most {layer.max_cache_len} positions")


class Verifier:
    """The dense check of one round for one `Decoder` and one `Correction`; its buffers are fixed, so
    on CUDA `verify` is captured once and replayed."""

    def __init__(self, decoder, correction: Correction):
        self.decoder = decoder
        self.correction = correction
        self.k = correction.every
        dev = decoder.device
        self._offsets = torch.arange(self.k + 1, device=dev)
        # the host's one read per round: [tokens accepted this round, every row finished]
        self.report = torch.zeros(2, dtype=torch.long, device=dev)
        self._graph: torch.cuda.CUDAGraph | None = None

    def _counters(self) -> list[torch.Tensor]:
        return [layer.cumulative_length for layer in self.decoder.cache.layers
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def _set_slot(self, slot: torch.Tensor) -> None:
        """Make every cache layer write its next entry at ``slot`` ([1] long)."""
        for counter in self._counters():
            counter.copy_(slot.view(counter.shape))
        capturing = slot.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:
            for layer in self.decoder.cache.layers:  # sliding layers keep a host copy of the count
                if hasattr(layer, "cumulative_length_int"):
                    layer.cumulative_length_int = int(slot)

    def _accepts(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """[B, k] bool: the dense logits [B, k, V] accept the drafts [B, k]."""
        rule = self.correction.acceptance
        greedy = drafts == logits.argmax(dim=-1)
        if rule.rule == "strict":
            return greedy
        probs = torch.softmax(logits.float() / rule.temperature, dim=-1)
        return greedy | (probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) >= rule.threshold)

    def verify(self, eager: bool = False) -> None:
        """After ``k`` sparse steps (the decoder's slot at ``p + k``): the dense check and rollback."""
        d, k = self.decoder, self.k
        start = d._pos - k  # [1]: the slot of t0
        slots = start + self._offsets  # [k + 1]
        ids = d._out.index_select(1, slots)  # [B, k + 1]: t0 .. tk
        positions = (d._row_pos - k).view(-1, 1) + self._offsets  # [B, k + 1]
        done_before = d._done_round.clone()  # rows finished before this round
        self._set_slot(start)
        mask = d._visible & (d._slots <= d._pos)  # causal inside the window comes from the cache's offset
        forward = d.model.forward if eager else d._forward
        out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=k + 1, **{d._cache_arg: d.cache})
        logits = out.logits[:, -(k + 1):]  # [B, k + 1, V]
        dense = logits.argmax(dim=-1)  # [B, k + 1]: the dense token for slots p+1 .. p+k+1
        drafts = ids[:, 1:]  # [B, k]
        ok = self._accepts(logits[:, :k], drafts)
        # a finished row (before this round, or at an accepted EOS draft) never holds the batch back
        draft_eos = (drafts.unsqueeze(-1) == d._eos).any(dim=-1)
        ok |= done_before.view(-1, 1) | ((draft_eos.long().cumsum(dim=1) - draft_eos.long()) > 0)
        accepted = ok.long().cumprod(dim=1).sum(dim=1).min()  # j: the batch rolls back together
        # committed tokens of slots p+1 .. p+j+1: the drafts before j, the dense token at j
        extended = torch.cat([drafts, dense[:, k:]], dim=1)
        tokens = torch.where(self._offsets < accepted, extended, dense)  # [B, k + 1]
        is_eos = (tokens.unsqueeze(-1) == d._eos).any(dim=-1)
        after_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
        tokens = torch.where(done_before.view(-1, 1) | after_eos, d._pad, tokens)
        d._out.index_copy_(1, slots + 1, tokens)
        finished = done_before | (is_eos & (self._offsets <= accepted)).any(dim=1)
        d._done.copy_(finished)
        d._done_round.copy_(finished)
        d._tokens.copy_(tokens.gather(1, accepted.view(1, 1).expand(tokens.shape[0], 1)))
        d._pos.copy_(start + accepted + 1)
        d._row_pos.sub_(k).add_(accepted + 1)
        self._set_slot(d._pos)
        self.report[0] = accepted
        self.report[1] = finished.all().long()

    def capture(self) -> None:
        """Warm up and capture `verify` on CUDA; every buffer it touches is restored afterwards."""
        d = self.decoder
        live = [*d._state(), d._done_round, self.report]
        saved = [t.clone() for t in live]

        def restore() -> None:
            for t, s in zip(live, saved):
                t.copy_(s)
            # as after k sparse steps: the window's KV writes go to slots not yet used (never the prompt's)
            d._pos.add_(self.k)
            d._row_pos.add_(self.k)

        stream = torch.cuda.Stream(d.device)
        stream.wait_stream(torch.cuda.current_stream(d.device))
        with torch.cuda.stream(stream):
            for i in range(3):
                restore()
                self.verify(eager=i == 0)
        torch.cuda.current_stream(d.device).wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.verify()
        for t, s in zip(live, saved):
            t.copy_(s)
        self._graph = graph

    def run(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self.verify()


def verifier(decoder, correction: Correction) -> Verifier:
    """The decoder's cached `Verifier` for ``correction`` (captured on first use when the decoder
    replays CUDA graphs)."""
    check_model(decoder)
    cache = decoder.__dict__.setdefault("_verifiers", {})
    found = cache.get(correction)
    if found is None:
        found = cache[correction] = Verifier(decoder, correction)
    if not hasattr(decoder, "_done_round"):
        decoder._done_round = torch.zeros_like(decoder._done)
    if decoder.use_graph and found._graph is None:
        found.capture()
    return found


@dataclass
class CorrectionStats:
    rounds: int = 0  # dense forwards after prefill
    drafted: int = 0  # sparse drafts the dense forwards judged (k per round)
    accepted: int = 0  # of those, accepted (the batch's common count)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_dense_forward(self) -> float:
        """Tokens committed per dense check: accepted drafts plus the dense model's own token."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else float("nan")


def decode(decoder, check: Verifier, max_new_tokens: int, stop_at_eos: bool) -> tuple[int, CorrectionStats]:
    """Rounds of ``k`` sparse steps and one dense check until ``max_new_tokens`` tokens are committed
    (the prefill's first token counts) or, with ``stop_at_eos``, every row has finished. Returns the
    decode steps to report (committed tokens after the first, at most ``max_new_tokens - 1``) and the
    round statistics. The decoder must be just after prefill (its first token emitted)."""
    k = check.k
    decoder._done_round.copy_(decoder._done)
    graph = decoder._graphs.get("greedy") if decoder.use_graph else None
    stats = CorrectionStats()
    committed = 1
    while committed < max_new_tokens:
        for _ in range(k):
            if graph is not None:
                graph.replay()
            else:
                decoder._step("greedy")
        check.run()
        accepted, finished = check.report.tolist()
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += accepted
        committed += accepted + 1
        if stop_at_eos and finished:
            break
    return min(committed, max_new_tokens) - 1, stats
