"""End-to-end decode speed: tokens/s of dense and sparsified models through the same fast loop.

`measure_bench` (behind ``countdown bench``; a `BenchPlan` run by `run_bench`) runs dense and every
(method, sparsity) at every batch size in one process on one model object, so the only difference
from the dense baseline is the FFN, and each speed-up divides by the dense tokens/s of the same batch
and route. Per point it times
`countdown.decode.Decoder` (the fast loop: static KV cache, CUDA graph, optionally torch.compile) and
`countdown.generate` on the same decoder (the user's call, prefill included); per configuration, GPU
memory after sparsify, the forward time of a long prompt (prefill) and, on request, plain
``model.generate``. Beside each batch-1 speed-up stands the ideal one from bytes: a decode step reads
every weight once (the input embedding only one row) plus the KV cache, and a sparse FFN reads only
the fraction of its weights its kernel needs at the sparsity measured on the generated tokens (plus
the predictor, for D-COUNTDOWN). The tables of a result are `countdown.report.bench_markdown`'s.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .api import calibrate, calibrate_methods, sparsify, unsparsify
from .attention import fuse_qkv as fuse_projections
from .attention import unfuse_qkv
from .decode import MAX_BATCH
from .evaluate import perplexity
from .generation import clear_cache, decoder_for, generate
from .methods import get_method
from .models import UnsupportedModelError, attention_sites, ffn_sites, step_weight_bytes
from .options import DecodeOptions, KernelPolicy


@dataclass
class ModelBytes:
    weights: int  # weight bytes one decode step reads (tied or not, the input embedding reads one row)
    ffn: int  # of which the FFNs'
    kv_per_position: int  # KV-cache bytes per cached position, all layers
    attention: dict[str, int] = field(default_factory=dict)  # attention projections' bytes per site (qkv, o)

    def per_token(self, context: float, ffn_fraction: float = 1.0, extra: int = 0,
                  attention_skipped: dict[str, float] | None = None) -> float:
        skipped = sum(self.attention.get(site, 0) * s for site, s in (attention_skipped or {}).items())
        return self.weights - self.ffn * (1.0 - ffn_fraction) - skipped + extra + self.kv_per_position * context


def model_bytes(model: nn.Module) -> ModelBytes:
    params = list(model.parameters())
    total = step_weight_bytes(model)
    ffn = sum(_nbytes(m.weight) for site in ffn_sites(model) for m in site.modules.values())
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elsize = params[0].element_size()
    kv = 2 * cfg.num_hidden_layers * kv_heads * head_dim * elsize
    attention = {}
    try:
        sites = attention_sites(model)
        attention = {"qkv": sum(_nbytes(p.weight) for s in sites for p in s.qkv), "o": sum(_nbytes(s.o.weight) for s in sites)}
    except UnsupportedModelError:
        pass  # attention input sparsity is offered for gated-FFN families only
    return ModelBytes(total, ffn, kv, attention)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def predictor_bytes(predictors: list[dict[str, torch.Tensor]] | None) -> int:
    if not predictors:
        return 0
    return sum(t.numel() * t.element_size() for p in predictors for t in p.values())


BATCH_LIMIT = MAX_BATCH
WARMUP_TOKENS = 16  # the warm-up call captures the graph (and compiles); a few replays suffice after it


def parse_batches(value: str | int | list, option: str = "--batch") -> list[int]:
    """Batch sizes from "1,2,4" (or an int, or a list): whole numbers from 1 to 16, duplicates dropped."""
    items = value if isinstance(value, list) else [value] if isinstance(value, int) else str(value).split(",")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            b = int(text)
        except ValueError:
            raise ValueError(f"{option} takes whole numbers from 1 to {BATCH_LIMIT} separated by commas, "
                             f"got {text!r}") from None
        if not 1 <= b <= BATCH_LIMIT:
            raise ValueError(f"{option}: batch size {b} is out of range; the fast loop serves 1 to {BATCH_LIMIT} "
                             "sequences")
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError(f"{option} is empty: give one or more batch sizes from 1 to {BATCH_LIMIT}")
    return out


@dataclass
class SpeedPoint:
    method: str
    target: float
    measured: float  # skipped fraction of FFN neurons on the generated tokens
    tokens_per_s: float  # fast loop decode steps per second (per sequence), median over repeats
    ms_per_token: float
    prefill_ms: float  # the fast loop's prefill of the B-row prompt, median
    speedup: float  # tokens/s over the same batch and route's dense tokens/s, same process, same loop
    ideal_speedup: float  # dense bytes per token over this method's bytes per token (batch 1 only)
    bytes_per_token: float  # bytes one decode step reads (weights once, every sequence's KV cache)
    gb_per_s: float  # bytes_per_token × steps per second
    match_dense: float  # fraction of generated tokens equal to the dense model's at the same position
    runs: list[float] = field(default_factory=list)  # tokens/s of every timed repeat
    batch: int = 1  # sequences decoded together; tokens/s is per sequence
    memory_gib: float = float("nan")  # GPU memory allocated with the model sparsified and this batch's decoder
    compiled: bool = False  # the decode step went through torch.compile before its CUDA graph
    route: str = ""  # "CUDA graph", "CUDA graph + compile", "eager" (CPU), "eager + compile"
    call_tokens_per_s: float = float("nan")  # new tokens / wall time of one whole fast-loop call (prefill in)
    generate_tokens_per_s: float = float("nan")  # the same through countdown.generate (the user's call)
    seconds: float = float("nan")  # what measuring this point took (compile, capture and checks included)

    @property
    def at_batch_one(self) -> bool:
        """The ideal speed-up from bytes is known (not nan): batch 1 only."""
        return self.ideal_speedup == self.ideal_speedup


@dataclass
class ConfigFigures:
    """What one configuration costs apart from decode speed (measured once, at the first batch size)."""

    method: str
    target: float
    memory_gib: float = float("nan")  # allocated after sparsify: weights, thresholds, predictors (CUDA only)
    prefill_ms: float = float("nan")  # forward of a prefill_len-token prompt as sparsified (default: prefill dense)
    prefill_all_ms: float = float("nan")  # the same with every prompt position sparse (positions="all")
    model_generate_tokens_per_s: float = float("nan")  # plain model.generate, greedy (with routes=True)
    hf_static: str = ""  # transformers' static-cache recipe (dense, with hf_static=True): tokens/s or its error


@dataclass
class BenchResult:
    points: list[SpeedPoint] = field(default_factory=list)
    configs: list[ConfigFigures] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # what the time limit left out
    seconds: float = 0.0


class _Budget:
    """Wall-clock guard: a step starts only if the longest step of its kind so far still fits."""

    def __init__(self, max_seconds: float | None):
        self.start = time.perf_counter()
        self.max_seconds = max_seconds
        self.cost: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, kind: str) -> bool:
        return self.max_seconds is None or self.elapsed() + self.cost.get(kind, 0.0) <= self.max_seconds

    def spent(self, kind: str, seconds: float) -> None:
        self.cost[kind] = max(self.cost.get(kind, 0.0), seconds)


def _sync(model: nn.Module) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def _wall(model: nn.Module, fn: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(model)
        t = time.perf_counter()
        fn()
        _sync(model)
        times.append(time.perf_counter() - t)
    return times


def _allocated_gib(model: nn.Module, settle: bool = False) -> float:
    if not next(model.parameters()).is_cuda:
        return float("nan")
    if settle:  # what stays allocated, not what the last step left for the collector
        gc.collect()
        torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**30


@torch.no_grad()
def time_prefill(model: nn.Module, n_tokens: int, repeats: int = 5, seed: int = 5) -> float:
    """Median wall time of one forward of ``n_tokens`` random token ids (batch 1, no cache), after a warm-up."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, n_tokens), generator=g).to(next(model.parameters()).device)
    run = lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
    run()
    return 1e3 * statistics.median(_wall(model, run, repeats))


@torch.no_grad()
def model_generate_tokens_per_s(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int = 2) -> float:
    """Per-sequence tokens/s of plain greedy ``model.generate`` (eager, dynamic cache), whole call."""
    pad = getattr(model.config, "pad_token_id", None) or 0
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=pad)
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
    times = _wall(model, lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw),
                  repeats)
    return new_tokens / statistics.median(times)


def hf_static_recipe(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64) -> str:
    """tokens/s of transformers' documented fast recipe (static cache, forward compiled with
    mode="reduce-overhead"), or the error it raises: what a user following the docs meets."""
    forward = model.forward
    try:
        model.forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
        model.generate(prompt, **kw)
        t = statistics.median(_wall(model, lambda: model.generate(prompt, **kw), 2))
        return f"{new_tokens / t:.1f} tokens/s"
    except Exception as err:  # noqa: BLE001 - the point is to record what users meet
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    finally:
        model.forward = forward
        torch._dynamo.reset()


@contextmanager
def _sparsified(model: nn.Module, name: str, s: float, calibration, preds, positions: str, attention: float | None):
    """The model sparsified for (name, s) inside the block, dense (and without cached decoders) after it."""
    if name != "dense":
        sparsify(model, name, s, calibration=calibration, positions=positions, predictors=preds, attention=attention,
                 max_windows=None, progress=False)
    try:
        yield
    finally:
        clear_cache(model)
        if name != "dense":
            unsparsify(model)


@torch.no_grad()
def _measure_point(model: nn.Module, name: str, s: float, prompt: torch.Tensor, *, new_tokens: int, repeats: int,
                   generate_repeats: int, compile: bool, positions: str, nbytes: ModelBytes, extra_bytes: int,
                   dense: SpeedPoint | None, dense_tokens: torch.Tensor | None) -> tuple[SpeedPoint, torch.Tensor]:
    """One (configuration, batch, route) point: the fast loop, then countdown.generate on the same decoder."""
    t_start = time.perf_counter()
    batch, n_prompt = prompt.shape
    # the decoder countdown.generate would make for this call, so its whole-call figure reuses the capture
    decoder = decoder_for(model, batch, n_prompt + new_tokens, compile)
    decoder.generate(prompt, min(new_tokens, WARMUP_TOKENS))  # capture, compile, kernel autotuning
    results, calls = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        results.append(decoder.generate(prompt, new_tokens))
        calls.append(time.perf_counter() - t)  # generate returns tokens on the CPU: the call has finished
    gen = lambda: generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=[], compile=compile)  # noqa: E731
    gen_calls = _wall(model, gen, generate_repeats) if generate_repeats else []
    memory = _allocated_gib(model)
    runs = [r.tokens_per_second for r in results]
    tps = statistics.median(runs)
    tokens = results[0].tokens[0, n_prompt:]
    if name == "dense":
        measured, fraction, attention_skipped = 0.0, 1.0, None
    else:  # the sparsity the masks really had on the generated tokens of the first sequence (reference path)
        seq = results[0].tokens[0]
        seen = perplexity(model, seq, context=seq.numel(), stride=new_tokens, positions=positions, progress=False)
        measured, fraction, attention_skipped = seen.sparsity, seen.ffn_bytes_read, seen.attention_sparsity
    context = batch * (n_prompt + new_tokens / 2)  # cached positions a step reads, mean over the steps
    b = nbytes.per_token(context, fraction, extra_bytes, attention_skipped)
    ideal = nbytes.per_token(context) / b if batch == 1 else float("nan")
    match = float((tokens == dense_tokens).float().mean()) if dense_tokens is not None else 1.0
    point = SpeedPoint(
        name, s, measured, tps, 1e3 / tps, 1e3 * statistics.median(r.prefill_seconds for r in results),
        tps / dense.tokens_per_s if dense is not None else 1.0, ideal, b, b * tps / 1e9, match, runs, batch, memory,
        compile, ("CUDA graph" if decoder.use_graph else "eager") + (" + compile" if compile else ""),
        new_tokens / statistics.median(calls), new_tokens / statistics.median(gen_calls) if gen_calls else float("nan"))
    clear_cache(model)
    if compile:
        torch._dynamo.reset()  # each point compiled a new graph; dropping them keeps dynamo under its recompile limit
    point.seconds = time.perf_counter() - t_start
    return point, tokens


@dataclass(frozen=True)
class BenchPlan:
    """What one bench run measures: dense and every (method, sparsity) at every batch size, and how
    (see `measure_bench` for each option). Checked when made; `for_model` fits it to a model."""

    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    batches: tuple[int, ...]
    new_tokens: int = 256
    repeats: int = 3
    generate_repeats: int = 2
    compile_batches: tuple[int, ...] = ()
    routes: bool = False
    route_tokens: int = 32
    prefill_len: int = 2048
    prefill_repeats: int = 5
    hf_static: bool = False
    positions: str = "decode"
    attention: float | None = None
    max_seconds: float | None = None
    fuse_qkv: bool = False

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.new_tokens < 2:
            raise ValueError("need repeats >= 1 and new_tokens >= 2")
        batches = parse_batches(list(self.batches), "batches")
        if any(b not in batches for b in self.compile_batches):
            raise ValueError(f"compile_batches {sorted(self.compile_batches)} must be among the batch sizes {batches}")
        object.__setattr__(self, "batches", tuple(batches))

    def for_model(self, model: nn.Module) -> BenchPlan:
        """The plan with the prefill prompt cut to the model's longest position."""
        limit = getattr(model.config, "max_position_embeddings", None) or self.prefill_len
        return dataclasses.replace(self, prefill_len=min(self.prefill_len, limit))

    @property
    def configs(self) -> list[tuple[str, float]]:
        """Dense first, then every (method, sparsity): the order of every batch."""
        return [("dense", 0.0)] + [(name, s) for name in self.methods for s in self.sparsities]

    def settings(self) -> dict:
        """The options a result records (`BenchResult.settings`)."""
        return dict(batches=list(self.batches), compile_batches=sorted(self.compile_batches),
                    new_tokens=self.new_tokens, repeats=self.repeats, generate_repeats=self.generate_repeats,
                    routes=self.routes, route_tokens=self.route_tokens, prefill_len=self.prefill_len,
                    positions=self.positions, attention=self.attention, max_seconds=self.max_seconds,
                    fuse_qkv=self.fuse_qkv,
                    # the options every point ran under (compile only at compile_batches)
                    decode_options=dataclasses.asdict(DecodeOptions()), kernel_policy=dataclasses.asdict(KernelPolicy()))


def measure_bench(
    model: nn.Module,
    methods: list[str],
    sparsities: list[float],
    calibration: torch.Tensor,
    *,
    batches: list[int],
    prompt_for: Callable[[int], torch.Tensor],
    new_tokens: int = 256,
    repeats: int = 3,
    generate_repeats: int = 2,
    predictors_for: Callable[[float], list] | None = None,
    compile_batches: Collection[int] = (),
    routes: bool = False,
    route_tokens: int = 32,
    prefill_len: int = 2048,
    prefill_repeats: int = 5,
    hf_static: bool = False,
    positions: str = "decode",
    attention: float | None = None,
    max_seconds: float | None = None,
    fuse_qkv: bool = False,
    log: Callable[[str], None] = print,
    on_update: Callable[[BenchResult], None] | None = None,
) -> BenchResult:
    """Dense and every (method, sparsity) at every batch size, in this process on this model object.

    ``prompt_for(b)`` gives the [b, P] prompt of batch size b; ``calibration`` [n, L] token windows for
    the thresholds (calibrated once per method and reused at every batch). At each batch dense runs
    first, and every speed-up divides by that batch's dense tokens/s on the same route: the CUDA-graph
    loop, compiled first at the batch sizes in ``compile_batches`` (one torch.compile per point). Per
    point: the fast loop's decode tokens/s, its whole-call tokens/s and `countdown.generate`'s (prefill
    included, same decoder). At the first batch size, per configuration: GPU memory after sparsify, the
    forward time of a ``prefill_len``-token prompt (0: skip) as sparsified and, for positions="decode",
    with every position sparse; ``routes``: plain ``model.generate`` tokens/s (``route_tokens`` new tokens;
    it is host-bound); ``hf_static`` (last, dense): transformers' static-cache recipe.

    ``max_seconds``: a step starts only if the longest one of its kind so far still fits; what is left
    out is listed in ``result.skipped``. ``fuse_qkv``: every configuration, dense included, computes q, k
    and v in one launch (`countdown.fuse_qkv`; the best dense baseline on CUDA), undone at the end.
    ``on_update(result)`` runs after every step (write partial
    results there). The ideal speed-up from bytes is given at batch 1 only (a batch reads the union of its
    kept rows, which per-token sparsity does not tell)."""
    for name in methods:
        if get_method(name).needs_predictor and predictors_for is None:
            raise ValueError(f"{name} needs predictors: pass predictors_for")
    plan = BenchPlan(tuple(methods), tuple(sparsities), tuple(batches), new_tokens=new_tokens, repeats=repeats,
                     generate_repeats=generate_repeats, compile_batches=tuple(compile_batches), routes=routes,
                     route_tokens=route_tokens, prefill_len=prefill_len, prefill_repeats=prefill_repeats,
                     hf_static=hf_static, positions=positions, attention=attention, max_seconds=max_seconds,
                     fuse_qkv=fuse_qkv)
    return run_bench(model, plan, calibration, prompt_for, predictors_for=predictors_for, log=log, on_update=on_update)


def run_bench(model: nn.Module, plan: BenchPlan, calibration: torch.Tensor, prompt_for: Callable[[int], torch.Tensor],
              *, predictors_for: Callable[[float], list] | None = None, log: Callable[[str], None] = print,
              on_update: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """`measure_bench` for a `BenchPlan`: calibrate once, then each batch size in turn (dense first),
    then transformers' recipe; the model is left as it was found."""
    run = _BenchRun(model, plan.for_model(model), calibration, predictors_for, log, on_update)
    run.calibrate_shared()
    with run.fused_qkv():
        for b in run.plan.batches:
            run.batch(b, prompt_for(b))
        if run.plan.hf_static:
            run.hf_static(prompt_for(run.plan.batches[0]))
    run.result.seconds = run.budget.elapsed()
    return run.result


class _BenchRun:
    """The state of one bench run: its plan, the time guard, the calibrations made so far and the result."""

    def __init__(self, model: nn.Module, plan: BenchPlan, calibration: torch.Tensor,
                 predictors_for: Callable[[float], list] | None, log: Callable[[str], None],
                 on_update: Callable[[BenchResult], None] | None):
        self.model, self.plan, self.calibration = model, plan, calibration
        self.predictors_for, self.log, self.on_update = predictors_for, log, on_update
        self.budget = _Budget(plan.max_seconds)
        self.result = BenchResult(settings=plan.settings())
        self.nbytes = model_bytes(model)
        self.device = next(model.parameters()).device
        self.cals: dict = {}

    def say(self, message: str) -> None:
        self.log(f"[{self.budget.elapsed():6.0f}s] {message}")

    def update(self) -> None:
        self.result.seconds = self.budget.elapsed()
        if self.on_update is not None:
            self.on_update(self.result)

    def calibrate_shared(self) -> None:
        """One calibration per method serves every batch (and the positions="all" prefill)."""
        if self.plan.attention is not None:
            return
        shared = [name for name in self.plan.methods if not get_method(name).needs_predictor]
        if shared:
            self.cals = calibrate_methods(self.model, shared, self.calibration, max_windows=None, progress=False)
        self.say(f"calibrated {', '.join(shared) or 'nothing shared'}")

    def inputs(self, name: str, s: float):
        """(calibration, predictors) that sparsify needs for (name, s)."""
        preds = self.predictors_for(s) if get_method(name).needs_predictor else None
        if name == "dense" or self.plan.attention is not None:
            return self.calibration, preds  # attention thresholds are calibrated with the FFN's, from tokens
        if (name, s) not in self.cals and name not in self.cals:  # predictor scores: calibrated per predictor set
            self.cals[(name, s)] = calibrate(self.model, name, self.calibration, predictors=preds, max_windows=None,
                                             progress=False)
        return self.cals.get(name, self.cals.get((name, s))), preds

    @contextmanager
    def fused_qkv(self):
        """q, k and v in one launch for every configuration, dense included, undone at the end."""
        fused = False
        if self.plan.fuse_qkv:
            try:
                self.say(f"q, k and v fused in {fuse_projections(self.model)} layers (every configuration, dense "
                         "included)")
                fused = True
            except (ValueError, TypeError, UnsupportedModelError) as err:  # e.g. phi3's single qkv_proj
                self.say(f"q, k and v not fused: {err}")
        try:
            yield
        finally:
            if fused:
                unfuse_qkv(self.model)

    def batch(self, b: int, prompt: torch.Tensor) -> None:
        """Dense, then every configuration at batch size ``b``, each as the time guard allows."""
        prompt = prompt.to(self.device)
        if prompt.dim() != 2 or prompt.shape[0] != b:
            raise ValueError(f"prompt_for({b}) must give [{b}, prompt_len] token ids, got {tuple(prompt.shape)}")
        compiled = b in self.plan.compile_batches
        kind = "compiled" if compiled else "graph"
        first = b == self.plan.batches[0]
        step = kind + (" with first-batch figures" if first else "")  # what the time guard compares
        dense: SpeedPoint | None = None
        dense_tokens = None
        for name, s in self.plan.configs:
            label = "dense" if name == "dense" else f"{name} @ {s:.0%}"
            if name != "dense" and dense is None:
                self.result.skipped.append(f"batch {b}: {label} (no dense point at this batch)")
                continue
            if not self.budget.allows(step):
                self.result.skipped.append(f"batch {b}: {label} ({kind})")
                self.say(f"batch {b}: {label} skipped: the time limit would not hold it")
                continue
            t0 = time.perf_counter()
            point, tokens, figures = self.configuration(name, s, prompt, compiled, first, dense, dense_tokens)
            if name == "dense":
                dense, dense_tokens = point, tokens
            self.result.points.append(point)
            if figures is not None:
                self.result.configs.append(figures)
            self.budget.spent(step, time.perf_counter() - t0)
            self.say(_point_line(b, kind, label, point))
            self.update()

    def configuration(self, name: str, s: float, prompt: torch.Tensor, compiled: bool, first: bool,
                      dense: SpeedPoint | None, dense_tokens: torch.Tensor | None
                      ) -> tuple[SpeedPoint, torch.Tensor, ConfigFigures | None]:
        """One configuration at one batch: its point and, at the first batch, its `ConfigFigures`."""
        plan, model = self.plan, self.model
        cal, preds = self.inputs(name, s)
        figures = ConfigFigures(name, s) if first else None
        with _sparsified(model, name, s, cal, preds, plan.positions, plan.attention):
            if figures is not None:
                figures.memory_gib = _allocated_gib(model, settle=True)
                if plan.prefill_len:
                    figures.prefill_ms = time_prefill(model, plan.prefill_len, plan.prefill_repeats)
            point, tokens = _measure_point(
                model, name, s, prompt, new_tokens=plan.new_tokens, repeats=plan.repeats,
                generate_repeats=plan.generate_repeats, compile=compiled, positions=plan.positions, nbytes=self.nbytes,
                extra_bytes=predictor_bytes(preds), dense=dense, dense_tokens=dense_tokens)
            if figures is not None and plan.routes:
                figures.model_generate_tokens_per_s = model_generate_tokens_per_s(model, prompt, plan.route_tokens)
        if figures is not None and plan.prefill_len and name != "dense" and plan.positions == "decode":
            with _sparsified(model, name, s, cal, preds, "all", plan.attention):
                figures.prefill_all_ms = time_prefill(model, plan.prefill_len, plan.prefill_repeats)
        return point, tokens, figures

    def hf_static(self, prompt: torch.Tensor) -> None:
        """transformers' static-cache recipe on the dense model, last, as the time guard allows."""
        if self.budget.allows("hf_static"):
            figures = next((c for c in self.result.configs if c.method == "dense"), None)
            if figures is not None:
                figures.hf_static = hf_static_recipe(self.model, prompt.to(self.device))
                self.say(f"transformers' static-cache recipe (dense): {figures.hf_static}")
        else:
            self.result.skipped.append("transformers' static-cache recipe")
        self.update()


def _point_line(b: int, kind: str, label: str, point: SpeedPoint) -> str:
    """The log line of one measured point."""
    return (f"batch {b} {kind}: {label}: {point.tokens_per_s:.1f} tokens/s per sequence, {point.speedup:.2f}x dense"
            + (f" (ideal {point.ideal_speedup:.2f}x)" if point.at_batch_one else "")
            + (f", measured sparsity {point.measured:.1%}" if point.method != "dense" else "")
            + f", countdown.generate {point.generate_tokens_per_s:.1f} tokens/s; {point.seconds:.0f}s")


def measure_speed(
    model: nn.Module,
    methods: list[str],
    sparsities: list[float],
    prompt: torch.Tensor,
    calibration: torch.Tensor,
    *,
    new_tokens: int = 256,
    repeats: int = 5,
    predictors_for: Callable[[float], list] | None = None,
    compile: bool = False,
    positions: str = "decode",
    attention: float | None = None,
    log: Callable[[str], None] = print,
) -> list[SpeedPoint]:
    """Dense first, then every (method, sparsity) in threshold mode at one batch: `measure_bench` for
    ``prompt`` [B, P] alone, without the prefill and route figures."""
    b = prompt.shape[0]
    return measure_bench(model, methods, sparsities, calibration, batches=[b], prompt_for=lambda _: prompt,
                         new_tokens=new_tokens, repeats=repeats, predictors_for=predictors_for,
                         compile_batches=[b] if compile else [], prefill_len=0, positions=positions,
                         attention=attention, log=log).points


def read_bandwidth_gbs(device: torch.device | str = "cpu", gib: float = 1.0, repeats: int = 5) -> float:
    """The device's read bandwidth in GB/s: the median time of ``x.sum()`` over a ``gib`` GiB fp32 buffer
    (what a decode step's weight reads are measured against: achieved GB/s / this = share of the peak)."""
    device = torch.device(device)
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    times = []
    for _ in range(repeats):
        _sync_device(device)
        t = time.perf_counter()
        x.sum()
        _sync_device(device)
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DecodeSpeedProbe:
    """Decode tokens/s of each configuration a grid evaluates (`countdown run`), measured on the model as
    the grid leaves it: call it with the model after each point (``run_grid(extra_eval=probe)``); it
    times `countdown.generate` (greedy, ``new_tokens`` new tokens after ``prompt``, median of ``repeats``
    after one warm-up: decode steps only, prefill excluded) and returns no extra figures. The grid runs dense first, so every later row has a
    × dense in the same process (`markdown`)."""

    def __init__(self, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3):
        self.prompt, self.new_tokens, self.repeats = prompt, new_tokens, repeats
        self.tokens_per_s: dict[tuple[str, float], float] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict:
        from .ffn import sparsity_spec

        spec = sparsity_spec(model)
        key = ("dense", 0.0) if spec is None else (spec.method, spec.sparsity)
        prompt = self.prompt.to(next(model.parameters()).device)
        # the Decoder countdown.generate would use; its result times the decode steps alone
        decoder = decoder_for(model, prompt.shape[0], prompt.shape[-1] + self.new_tokens)
        decoder.generate(prompt, self.new_tokens)  # warm-up: kernel layout, extension load
        self.tokens_per_s[key] = statistics.median(
            decoder.generate(prompt, self.new_tokens).tokens_per_second for _ in range(self.repeats))
        clear_cache(model)
        return {}

    def markdown(self, points: list) -> str:
        """method | target | ppl | decode tokens/s | × dense, one row per grid point measured."""
        dense = self.tokens_per_s.get(("dense", 0.0), float("nan"))
        lines = ["| method | target | ppl | decode tokens/s | × dense |", "|---|---|---|---|---|"]
        for p in points:
            tps = self.tokens_per_s.get(("dense", 0.0) if p.method == "dense" else (p.method, p.target))
            if tps is None:
                continue
            target = "—" if p.method == "dense" else f"{p.target:.0%}"
            lines.append(f"| {p.method} | {target} | {p.ppl:.3f} | {tps:.1f} | {tps / dense:.2f} |")
        return "\n".join(lines) + "\n"
