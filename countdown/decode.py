"""A fast generation loop: static KV cache, the decode step replayed as a CUDA graph.

Eager ``model.generate`` spends most of each token in Python and kernel launches, which hides any
FFN saving. `Decoder` removes that overhead the same way for a dense and a sparsified model (the
model object is used as is: a sparsified model differs only in its FFN modules), so a tokens/s ratio
between the two measures the FFN. On CUDA one decode step (embedding, every layer, the LM head, the
token choice, end-of-sequence bookkeeping, the cache write and the position increments) is captured
once as a CUDA graph and replayed per token; the loop looks at the device only every
`Decoder.check_every` steps, and only when it may stop early. On the CPU the same step runs eagerly,
its dense linears through the C++ GEMV of `countdown.cpu_route` (sparse modules pick their C++ kernels),
compiled too with ``DecodeOptions(compile=True)`` (the C++ ops are registered torch ops).

A decoder serves one batch size (1 to `MAX_BATCH`) and one cache length. Rows may be left-padded:
like ``model.generate``, each row's positions count its unmasked tokens, and masked slots are never
attended. Greedy tokens equal ``model.generate(do_sample=False)`` (tested, with and without padding,
with and without end-of-sequence tokens); sampling (`countdown.sampling`) draws on the device from a
generator the decoder owns, seeded per call from the caller's generator or the global RNG.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from . import correction as correction_mod
from . import cpu_route, gqa_decode, sampling
from .options import MAX_BATCH, DecodeOptions

MAX_EOS = 16  # end-of-sequence ids one call may name (a fixed-size buffer, so no recapture)


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [B, prompt + new] on the CPU, prompt included (as model.generate returns)
    new_tokens: int  # new tokens per row (fewer than asked when every row stopped at an EOS)
    prefill_seconds: float
    decode_seconds: float  # the replayed steps (the first new token comes from prefill)
    steps: int = -1  # decode steps run; may exceed new_tokens - 1 by up to check_every when stopping early
    # with correct_every: dense checks, drafts judged and accepted (steps then counts committed tokens)
    correction: correction_mod.CorrectionStats | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            self.steps = self.new_tokens - 1

    @property
    def tokens_per_second(self) -> float:
        """Decode speed of one row: steps per second of decoding (prefill excluded)."""
        return self.steps / self.decode_seconds if self.steps > 0 and self.decode_seconds > 0 else float("nan")

    @property
    def batch_tokens_per_second(self) -> float:
        """Decode speed of the whole batch: rows × steps per second."""
        return self.tokens.shape[0] * self.tokens_per_second


def _token_ids(value: int | Sequence[int] | torch.Tensor | None, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    ids = [value] if isinstance(value, int) else list(value)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return ids


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` in transformers >= 5.25 (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _compiled(forward, options: DecodeOptions):
    """``torch.compile(forward)`` with the options' Inductor settings, plus programmatic dependent launch
    of Inductor's kernels with ``compile_pdl`` where this torch knows the option."""
    import torch._inductor.config as inductor_config

    settings = dict(options.compile_options)
    if options.compile_pdl and hasattr(inductor_config.triton, "enable_pdl"):
        settings["triton.enable_pdl"] = True
    return torch.compile(forward, dynamic=False, fullgraph=False, options=settings)


def options_with(options: DecodeOptions | None, compile: bool | None = None) -> DecodeOptions:
    """``options`` (default: DecodeOptions()) with the ``compile=`` shortcut applied when it is given."""
    if options is None:
        options = DecodeOptions()
    elif not isinstance(options, DecodeOptions):
        raise TypeError(f"options must be a countdown.DecodeOptions, got {type(options).__name__}")
    if compile is not None and bool(compile) != options.compile:
        options = dataclasses.replace(options, compile=bool(compile))
    return options


class Decoder:
    """Generation for one model, ``batch_size`` rows and a static cache of ``max_len`` positions.

    ``cuda_graph="auto"`` captures the decode step when the model is on CUDA. ``options``
    (`countdown.DecodeOptions`) holds the loop's choices: ``compile`` additionally runs the model's
    forward through ``torch.compile`` (fuses the small elementwise kernels of norms and rotary
    embeddings) before capture, with ``compile_options`` (Inductor's coordinate-descent tuning by
    default: the compile takes ~20 s longer; on the Llama-3-8B shape it made the dense step 7% faster at
    batch 1, docs/BENCHMARKS.md); ``gqa_attention`` and ``attention_kernel`` choose the one-token
    attention of grouped-query models. ``compile=True`` is a shortcut for ``options=DecodeOptions(compile=True)``.
    The first `generate` call of each kind (greedy, plain sampling, filtered sampling) pays for warm-up
    and capture; later calls replay
    (the prompt length and the sampling values may change; the batch size and ``max_len`` may not).
    A captured graph keeps the model's modules and tensors it saw: after changing the model
    (`countdown.sparsify`, ``.to()``) make a new Decoder."""

    check_every = 16  # steps between looks at the device's "every row finished" flag

    def __init__(self, model: nn.Module, max_len: int, *, batch_size: int = 1, cuda_graph: str | bool = "auto",
                 compile: bool | None = None, options: DecodeOptions | None = None):
        from transformers import StaticCache

        options = options_with(options, compile)
        if not hasattr(model, "config") or not callable(getattr(model, "forward", None)):
            raise TypeError("Decoder needs a transformers causal LM (a model with .config and .forward)")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be an int from 1 to {MAX_BATCH}, got {batch_size!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_len > limit:
            raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings ({limit})")
        self.model = model
        self.options = options
        self.max_len = max_len
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if cuda_graph == "auto":  # an offloaded model (`countdown.offload`) moves a varying row count per step
            cuda_graph = self.device.type == "cuda" and "_countdown_offload" not in model.__dict__
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on CUDA, it is on {self.device}")
        self.use_graph = bool(cuda_graph)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._cache_arg = _cache_argument(model)
        # the step's inputs, outputs and settings live in fixed buffers, so a captured graph can replay it
        b, dev = batch_size, self.device
        self._tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)  # the token each row feeds next
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its cache slot (the same for every row)
        self._row_pos = torch.zeros(b, dtype=torch.long, device=dev)  # its position (rows differ by padding)
        self._slots = torch.arange(max_len, device=dev)
        self._visible = torch.ones(b, max_len, dtype=torch.bool, device=dev)  # False at prompt padding
        self._out = torch.zeros(b, max_len, dtype=torch.long, device=dev)
        self._done = torch.zeros(b, dtype=torch.bool, device=dev)
        self._eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=dev)  # -1 never matches a token
        self._pad = torch.zeros((), dtype=torch.long, device=dev)
        self._temperature = torch.ones((), dtype=torch.float32, device=dev)
        self._top_k = torch.ones((), dtype=torch.long, device=dev)
        self._top_p = torch.ones((), dtype=torch.float32, device=dev)
        self._rng = torch.Generator(device=dev)
        # the CPU route's forwards are made once, so a compiled step's trace holds across generate calls
        self._route = cpu_route.Route(model) if self.device.type == "cpu" and options.cpu_linears else None
        self._forward = model.forward
        if options.compile:
            self._forward = _compiled(model.forward, options)
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}

    def __repr__(self) -> str:
        return (f"Decoder({type(self.model).__name__}, max_len={self.max_len}, batch_size={self.batch_size}, "
                f"cuda_graph={self.use_graph}, options={self.options!r})")

    # -- one step ---------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        """Next token per row [B] from the last position's logits [B, V]."""
        if kind == "greedy":
            return logits.argmax(dim=-1)
        if kind == "sample":
            return sampling.sample(logits, self._temperature, None, None, self._rng)
        return sampling.sample(logits, self._temperature, self._top_k, self._top_p, self._rng)

    def _emit(self, nxt: torch.Tensor) -> None:
        """Record the rows' next tokens [B] at slot self._pos; a finished row gets the pad token."""
        nxt = torch.where(self._done, self._pad, nxt)
        self._done |= (nxt.unsqueeze(1) == self._eos).any(dim=1)
        self._tokens.copy_(nxt.view(-1, 1))
        self._out.index_copy_(1, self._pos, nxt.view(-1, 1))

    def _step(self, kind: str, eager: bool = False) -> None:
        """Feed self._tokens at slot self._pos; write the choice to self._tokens and self._out[:, pos+1]."""
        # a row sees its unpadded prompt slots and every filled slot after the prompt
        mask = self._visible & (self._slots <= self._pos)
        forward = self.model.forward if eager else self._forward
        out = forward(input_ids=self._tokens, attention_mask=mask, position_ids=self._row_pos.view(-1, 1),
                      use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        nxt = self._choose(out.logits[:, -1], kind)
        self._pos.add_(1)
        self._row_pos.add_(1)
        self._emit(nxt)

    def _state(self) -> list[torch.Tensor]:
        # transformers' static cache layers write at their own running counter, not at a given position
        counters = [layer.cumulative_length for layer in self.cache.layers
                    if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)]
        return [self._pos, self._row_pos, self._tokens, self._done, self._out, *counters]

    def _capture(self, kind: str) -> None:
        """Warm up and capture one step; afterwards every buffer the step touches is as before."""
        live = self._state()
        saved = [t.clone() for t in live]

        def restore() -> None:
            for t, s in zip(live, saved):
                t.copy_(s)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning, lazy buffers, cuBLAS handles
            for i in range(3):  # the first one eager, so nothing lazy happens inside a compile trace
                restore()
                self._step(kind, eager=i == 0)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        restore()
        graph = torch.cuda.CUDAGraph()
        if kind != "greedy":
            graph.register_generator_state(self._rng)  # replays draw fresh numbers from self._rng
        with torch.cuda.graph(graph):
            self._step(kind)
        restore()  # capture records the step without running it
        self._graphs[kind] = graph

    # -- generation -------------------------------------------------------------------------------
    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.long:
            raise TypeError("input_ids must be a torch.long tensor of token ids")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, prompt] or [prompt], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"this Decoder generates for batch size {self.batch_size} (at most {MAX_BATCH}); "
                             f"input_ids has {input_ids.shape[0]} rows")
        if input_ids.shape[1] < 1:
            raise ValueError("the prompt is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        need = input_ids.shape[1] + max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                             f"exceeds the cache (max_len={self.max_len}); make a Decoder with a larger max_len")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError("attention_mask must be a tensor of 0/1 like input_ids")
            if attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"input_ids {tuple(input_ids.shape)}: they must match")
            if not ((attention_mask == 0) | (attention_mask == 1)).all():
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
            if not attention_mask.bool().any(dim=1).all():
                raise ValueError("a row of attention_mask is all zeros: every row needs at least one token")
            if attention_mask.bool().all():
                attention_mask = None  # nothing padded: the same as no mask, and prefill keeps its causal fast path
        return input_ids, attention_mask

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _seed(self, generator: torch.Generator | None) -> int:
        # one draw from the caller's generator (or the global RNG) seeds the decoder's own generator,
        # which the captured graph reads from; the same seed gives the same tokens every call
        dev = generator.device if generator is not None else torch.device("cpu")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        correct_every: int | None = None,
        accept: str | correction_mod.Acceptance = "strict",
    ) -> DecodeResult:
        """Generate up to ``max_new_tokens`` after ``input_ids`` ([B, P] or [P]); times prefill and decode.

        ``attention_mask`` [B, P]: 0 at (left) padding. ``eos_token_id`` (None: never stop early):
        a row that produced one gets ``pad_token_id`` (default: the first EOS id) from then on, and
        generation stops once every row has. Sampling arguments as in ``model.generate``.
        ``correct_every=k`` (greedy only): Sirius correction, `countdown.correction`: every ``k`` sparse
        steps one dense forward checks them (``accept``: "strict", "relaxed" or an `Acceptance`) and
        rolls back to the first rejected token; the cache needs ``k`` spare slots."""
        attention = (gqa_decode.decode_attention(self.model, self.options.attention_kernel)
                     if self.options.gqa_attention else nullcontext())
        # on a CPU, the dense linears of each step through the C++ GEMV (`countdown.cpu_route`)
        with attention, (self._route if self._route is not None else nullcontext()):
            return self._generate(input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                                  eos_token_id, pad_token_id, generator, correct_every, accept)

    def _generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                  eos_token_id, pad_token_id, generator, correct_every=None, accept="strict") -> DecodeResult:
        correction = correction_mod.resolve(correct_every, accept, do_sample)
        input_ids, attention_mask = self._check(input_ids, attention_mask,
                                                max_new_tokens + (correction.every if correction else 0))
        sampling.check_sampling(do_sample, temperature, top_k, top_p)
        eos = _token_ids(eos_token_id, "eos_token_id")
        if len(eos) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} eos_token_id values, got {len(eos)}")
        pad = _token_ids(pad_token_id, "pad_token_id")
        if len(pad) > 1:
            raise ValueError(f"pad_token_id must be one int, got {pad_token_id!r}")
        pad = pad[0] if pad else (eos[0] if eos else 0)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        kind = "greedy" if not do_sample else ("sample" if top_k is None and top_p is None else "filter")
        seed = self._seed(generator) if do_sample else 0

        input_ids = input_ids.to(self.device)
        n_prompt = input_ids.shape[1]
        self.cache.reset()
        self._eos.fill_(-1)
        if eos:
            self._eos[: len(eos)] = torch.tensor(eos, device=self.device)
        self._pad.fill_(pad)
        self._temperature.fill_(float(temperature))
        self._top_k.fill_(top_k or 1 << 30)  # past the vocabulary: no top-k filter
        self._top_p.fill_(1.0 if top_p is None else float(top_p))
        self._done.zero_()
        self._out.zero_()
        self._visible.fill_(True)
        if attention_mask is None:
            positions = torch.arange(n_prompt, device=self.device).expand(self.batch_size, -1)
            mask = None  # prefill attends causally; the empty slots lie in every query's future
        else:
            attention_mask = attention_mask.to(self.device).bool()
            self._visible[:, :n_prompt] = attention_mask
            # as model.generate: a position counts the row's unmasked tokens before it (padding sits at 0)
            positions = (attention_mask.long().cumsum(dim=1) - 1).masked_fill(~attention_mask, 0)
            mask = self._visible
        self._sync()
        t0 = time.perf_counter()
        # prefill runs eagerly: its shape changes with the prompt
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        self._rng.manual_seed(seed)
        first = self._choose(out.logits[:, -1], kind)
        self._pos.fill_(n_prompt)
        self._row_pos.copy_(positions[:, -1] + 1)
        self._emit(first)
        self._sync()
        t1 = time.perf_counter()
        if self.use_graph and kind not in self._graphs and max_new_tokens > 1:
            self._capture(kind)
            self._sync()
            t1 = time.perf_counter()
        steps, stats = 0, None
        if correction is not None and max_new_tokens > 1:  # greedy: no random numbers to seed
            check = correction_mod.verifier(self, correction)
            self._sync()
            t1 = time.perf_counter()
            steps, stats = correction_mod.decode(self, check, max_new_tokens, bool(eos))
        self._rng.manual_seed(seed + 1)  # the same draws whether or not this call captured first
        graph = self._graphs.get(kind) if self.use_graph else None
        while stats is None and steps < max_new_tokens - 1:
            if eos and steps % self.check_every == 0 and bool(self._done.all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._step(kind)
            steps += 1
        self._sync()
        t2 = time.perf_counter()
        new = self._out[:, n_prompt : n_prompt + steps + 1].cpu()
        if eos:
            # as model.generate: stop after the step at which the last row produced its first EOS
            is_eos = torch.isin(new, torch.tensor(eos))
            if bool(is_eos.any(dim=1).all()):
                new = new[:, : int(is_eos.long().argmax(dim=1).max()) + 1]
        tokens = torch.cat([input_ids.cpu(), new], dim=1)
        return DecodeResult(tokens, new.shape[1], t1 - t0, t2 - t1, steps, stats)
