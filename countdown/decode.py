"""A fast batch-1 greedy generation loop: static KV cache, the decode step replayed as a CUDA graph.

Eager ``model.generate`` at batch 1 spends most of each token in Python and kernel launches, which
hides any FFN saving. `Decoder` removes that overhead the same way for a dense and a sparsified model
(the model object is used as is: a sparsified model differs only in its FFN modules), so a tokens/s
ratio between the two measures the FFN. On CUDA one decode step (embedding, every layer, the LM head,
argmax, the cache write and the position increment) is captured once as a CUDA graph and replayed per
token; the loop never waits for the GPU. On the CPU the same step runs eagerly (useful for tests).

Greedy tokens equal ``model.generate(do_sample=False)`` for the dense model (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [1, prompt + new] on the CPU, prompt included (as model.generate returns)
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float  # the new_tokens - 1 replayed steps (the first new token comes from prefill)

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: generated tokens after the first, per second of decoding (prefill excluded)."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else float("nan")


class Decoder:
    """Greedy generation for one model with a static cache of ``max_len`` positions.

    ``cuda_graph="auto"`` captures the decode step when the model is on CUDA; ``compile=True``
    additionally runs the step through ``torch.compile`` (fuses the small elementwise kernels of
    norms and rotary embeddings) before capture. The first `generate` call pays for warm-up and
    capture; later calls reuse the graph (the prompt length may change, ``max_len`` may not)."""

    def __init__(self, model: nn.Module, max_len: int, *, cuda_graph: str | bool = "auto", compile: bool = False):
        from transformers import StaticCache

        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise TypeError("Decoder needs a transformers causal LM (a model with .config and .forward)")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings ({limit})")
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        if cuda_graph == "auto":
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on CUDA, it is on {self.device}")
        self.use_graph = bool(cuda_graph)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # the step's inputs and outputs live in fixed buffers, so a captured graph can replay it
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._positions = torch.arange(max_len, device=self.device)
        self._out = torch.zeros(max_len, dtype=torch.long, device=self.device)
        self._forward = torch.compile(model.forward, dynamic=False, fullgraph=False) if compile else model.forward
        self._graph: torch.cuda.CUDAGraph | None = None

    # -- one step ---------------------------------------------------------------------------------
    def _step(self, eager: bool = False) -> None:
        """Feed self._token at position self._pos; write the argmax to self._token and self._out[pos+1]."""
        # 1 for every filled cache slot (positions <= pos), 0 for the empty rest of the static cache
        mask = (self._positions <= self._pos).unsqueeze(0).long()
        forward = self.model.forward if eager else self._forward
        out = forward(input_ids=self._token, attention_mask=mask, position_ids=self._pos.view(1, 1),
                            cache_position=self._pos, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1)
        nxt = out.logits[0, -1].argmax(-1)
        self._pos.add_(1)
        self._token.copy_(nxt.view(1, 1))
        self._out.index_copy_(0, self._pos, nxt.view(1))

    def _counters(self) -> list[torch.Tensor]:
        # transformers' static cache layers write at their own running counter, not at cache_position
        return [layer.cumulative_length for layer in self.cache.layers
                if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]

    def _restore(self, pos: torch.Tensor, token: torch.Tensor, counters: list[torch.Tensor]) -> None:
        self._pos.copy_(pos)
        self._token.copy_(token)
        for live, saved in zip(self._counters(), counters):
            live.copy_(saved)

    def _capture(self) -> None:
        """Warm up and capture one step; afterwards every buffer the step touches is as before."""
        pos, token = self._pos.clone(), self._token.clone()
        counters = [c.clone() for c in self._counters()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning, lazy buffers, cuBLAS handles
            for i in range(3):  # the first one eager, so nothing lazy happens inside a compile trace
                self._restore(pos, token, counters)
                self._step(eager=i == 0)
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(pos, token, counters)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._restore(pos, token, counters)  # capture records the step without running it
        self._graph = graph

    # -- generation -------------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
            raise TypeError("input_ids must be a torch.long tensor of token ids")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"Decoder generates for batch size 1 only; input_ids has shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] < 1:
            raise ValueError("the prompt is empty")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        need = input_ids.shape[1] + max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                             f"exceeds the cache (max_len={self.max_len}); make a Decoder with a larger max_len")
        return input_ids

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> DecodeResult:
        """Greedy-decode ``max_new_tokens`` after ``input_ids`` ([1, P] or [P]); times prefill and decode."""
        input_ids = self._check(input_ids, max_new_tokens).to(self.device)
        n_prompt = input_ids.shape[1]
        self.cache.reset()
        self._sync()
        t0 = time.perf_counter()
        # prefill runs eagerly (its shape changes with the prompt); an all-ones mask over the prompt
        # lets the attention use its causal fast path while the empty cache slots stay unseen
        positions = torch.arange(n_prompt, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        first = out.logits[0, -1].argmax(-1)
        self._token.copy_(first.view(1, 1))
        self._pos.fill_(n_prompt)
        self._out.zero_()
        self._out[n_prompt] = first
        self._sync()
        t1 = time.perf_counter()
        if self.use_graph and self._graph is None and max_new_tokens > 1:
            self._capture()
            self._sync()
            t1 = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
        self._sync()
        t2 = time.perf_counter()
        new = self._out[n_prompt : n_prompt + max_new_tokens].cpu()
        tokens = torch.cat([input_ids[0].cpu(), new]).unsqueeze(0)
        return DecodeResult(tokens, max_new_tokens, t1 - t0, t2 - t1)
