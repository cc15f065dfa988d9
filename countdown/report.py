"""Tables and plots: of sweep points (the terminal table, CSV/JSON/Markdown files, PNG figures) and of
`countdown bench` results (`bench_markdown`: the batch table, then routes, memory and prefill)."""

from __future__ import annotations

import csv
import json
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .sweep import Point

if TYPE_CHECKING:
    from .speed import BenchResult, SpeedPoint

_COLUMNS = ("method", "mode", "protocol", "target", "measured", "ppl", "Δppl", "FFN bytes read")
# "ideal" in the COUNTDOWN paper is the per-token top-k; "practical" the calibrated threshold
_MODE_NAMES = {"topk": "top-k", "threshold": "threshold", "dense": "dense"}
MODES_NOTE = ("mode: top-k = per-token top-k (the paper's SP-ideal); threshold = per-layer calibrated threshold "
              "(the paper's SP-practical). protocol: count rule (floor: drop int(D·s) per token; round), "
              "ties (strict: keep score > k-th smallest, as the official code; exact k), threshold rule "
              "(pooled quantile, or mean/median over forwards of the per-token k-th score), positions "
              "(all: every position sparse; decode: context dense, continuation sparse).")


def _wrap(title: str, width: int = 70) -> str:
    """Long titles (they name the protocol) on several lines, so a figure never cuts them off."""
    return "\n".join(textwrap.wrap(title, width))


def _cells(p: Point) -> list[str]:
    dense = p.method == "dense"
    return [
        p.method,
        _MODE_NAMES.get(p.mode, p.mode),
        p.protocol,
        "—" if dense else f"{p.target:.0%}",
        "—" if dense else f"{p.measured:.1%}",
        f"{p.ppl:.3f}",
        "—" if dense else f"{p.delta_ppl:+.3f}",
        f"{p.ffn_bytes_read:.0%}",
    ]


def print_table(points: list[Point], title: str, console: Console | None = None) -> None:
    """The terminal table. When every sparse point shares one protocol it goes in the caption, so the
    table fits an 80-column terminal; mixed protocols keep their columns."""
    sparse = [p for p in points if p.method != "dense"]
    shared = len({(p.mode, p.protocol) for p in sparse}) == 1
    columns = [c for c in _COLUMNS if not (shared and c in ("mode", "protocol"))]
    caption = MODES_NOTE if not shared else f"protocol: {sparse[0].protocol}. {MODES_NOTE}"
    table = Table(title=title, caption=caption)
    for col in columns:
        table.add_column(col, justify="left" if col in ("method", "mode") else "right", no_wrap=col == "method")
    for p in points:
        cells = dict(zip(_COLUMNS, _cells(p)))
        table.add_row(*(cells[c] for c in columns))
    (console or Console()).print(table)


def markdown_table(points: list[Point]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(p)) + " |" for p in points]
    return "\n".join(lines) + "\n\n" + MODES_NOTE + "\n"


def write_files(points: list[Point], out_dir: Path) -> dict[str, Path]:
    """results.csv, results.json and table.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "md": out_dir / "table.md"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "mode", "protocol", "positions", "count_rule", "ties", "threshold_rule",
                         "threshold_adjust", "target", "measured", "ppl", "delta_ppl", "ffn_bytes_read", "n_tokens",
                         "seconds"])
        for p in points:
            writer.writerow([p.method, p.mode, p.protocol, p.positions, p.count_rule, p.ties, p.threshold_rule,
                             p.threshold_adjust, p.target, f"{p.measured:.5f}", f"{p.ppl:.5f}", f"{p.delta_ppl:.5f}",
                             f"{p.ffn_bytes_read:.5f}", p.n_tokens, f"{p.seconds:.2f}"])
    paths["json"].write_text(json.dumps([{**asdict(p), "protocol": p.protocol} for p in points], indent=1))
    paths["md"].write_text(markdown_table(points))
    return paths


def _series(points: list[Point]) -> dict[str, list[Point]]:
    """One line per method (per method and protocol when the points mix protocols), by target."""
    sparse = [p for p in points if p.method != "dense"]
    mixed = len({p.protocol for p in sparse}) > 1
    out: dict[str, list[Point]] = {}
    for p in sparse:
        out.setdefault(f"{p.method} ({p.protocol})" if mixed else p.method, []).append(p)
    return {label: sorted(pts, key=lambda p: p.target) for label, pts in out.items()}


def plot_ppl_vs_sparsity(points: list[Point], path: Path, title: str = "") -> Path:
    """Perplexity against measured sparsity, one line per method, dense as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = [p for p in points if p.method == "dense"]
    if dense:
        ax.axhline(dense[0].ppl, color="black", linestyle="--", linewidth=1, label=f"dense ({dense[0].ppl:.2f})")
    for i, (label, pts) in enumerate(_series(points).items()):  # past ten lines the colours repeat: dash those
        ax.plot([p.measured for p in pts], [p.ppl for p in pts], marker="os^"[i // 10 % 3], color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("measured FFN sparsity (fraction of neurons skipped per token)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(_wrap(title or "perplexity vs FFN sparsity"), fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layer_sparsity(points: list[Point], path: Path, title: str = "") -> Path:
    """Measured sparsity of each layer, one line per (method, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p in points:
        if p.method != "dense" and p.layer_sparsity:
            ax.plot(range(len(p.layer_sparsity)), p.layer_sparsity, label=f"{p.method} {p.target:.0%}", alpha=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("measured sparsity")
    ax.set_title(_wrap(title or "per-layer measured sparsity"), fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def task_names(points: list[Point]) -> list[str]:
    return sorted({task for p in points for task in p.extra})


def task_score(result: dict) -> tuple[float, float] | None:
    """(score, stderr) of one task result: accuracy, or exact match for generative tasks (gsm8k)."""
    for key in ("acc", "exact_match"):
        if key in result:
            return result[key], result.get(f"{key}_stderr", float("nan"))
    return None


def tasks_markdown(points: list[Point]) -> str:
    """Score per task (accuracy or exact match, ± stderr) for each point, with its protocol and the
    fraction of scored continuation tokens that were predicted by a dense position."""
    tasks = task_names(points)
    if not tasks:
        return ""
    head = ["method", "mode", "protocol", "target", "measured", "scored tokens dense", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        dense = [r["dense_scored"] for r in p.extra.values() if "dense_scored" in r]
        cells = [p.method, _MODE_NAMES.get(p.mode, p.mode), p.protocol,
                 "—" if p.method == "dense" else f"{p.target:.0%}",
                 "—" if p.method == "dense" else f"{p.measured:.1%}",
                 f"{min(dense):.0%}–{max(dense):.0%}" if dense else "—"]
        for t in tasks:
            score = task_score(p.extra.get(t, {}))
            cells.append(f"{score[0]:.3f} ± {score[1]:.3f}" if score else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + MODES_NOTE + " Generative tasks (gsm8k) report exact match.\n"


def plot_task_accuracy(points: list[Point], path: Path, title: str = "") -> Path | None:
    """Accuracy against measured sparsity: one panel per task, one line per method."""
    tasks = task_names(points)
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        dense = [p for p in points if p.method == "dense" and task_score(p.extra.get(task, {}))]
        if dense:
            acc, err = task_score(dense[0].extra[task])
            ax.axhline(acc, color="black", linestyle="--", linewidth=1, label="dense")
            if err == err:  # a band of ± one standard error: differences inside it are noise
                ax.axhspan(acc - err, acc + err, color="black", alpha=0.08, label="dense ± 1 s.e.")
        for label, pts in _series([p for p in points if task_score(p.extra.get(task, {}))]).items():
            ax.plot([p.measured for p in pts], [task_score(p.extra[task])[0] for p in pts], marker="o", label=label)
        ax.set_title(task, fontsize="small")
        ax.set_xlabel("measured sparsity")
        ax.set_ylabel("accuracy (gsm8k: exact match)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle(_wrap(title or "task accuracy vs FFN sparsity"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_speedup(points: list, path: Path, title: str = "") -> Path:
    """Measured end-to-end speed-up (solid) and the ideal from bytes (dashed, batch 1 only) against
    measured sparsity, one colour per method and one marker per batch size and route; ``points`` are
    `countdown.speed.SpeedPoint`s (each speed-up is against dense at its own batch and route)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="dense")
    groups = list(dict.fromkeys((getattr(p, "batch", 1), getattr(p, "compiled", False)) for p in points))
    markers = "os^vD<>ph*"
    for i, method in enumerate(dict.fromkeys(p.method for p in points if p.method != "dense")):
        color = f"C{i}"
        for j, (batch, compiled) in enumerate(groups):
            pts = sorted((p for p in points if p.method == method and getattr(p, "batch", 1) == batch
                          and getattr(p, "compiled", False) == compiled), key=lambda p: p.measured)
            if not pts:
                continue
            label = method if len(groups) == 1 else f"{method}, batch {batch}{' compiled' if compiled else ''}"
            ax.plot([p.measured for p in pts], [p.speedup for p in pts], marker=markers[j % len(markers)], color=color,
                    alpha=1.0 - 0.6 * j / max(1, len(groups)), label=label)
            if all(p.ideal_speedup == p.ideal_speedup for p in pts):  # nan beyond batch 1
                ax.plot([p.measured for p in pts], [p.ideal_speedup for p in pts], linestyle="--", marker="x",
                        color=color, alpha=0.6)
    ax.set_xlabel("measured FFN sparsity")
    ax.set_ylabel("tokens/s ÷ dense, same batch (dashed: ideal)")
    ax.set_title(_wrap(title or "end-to-end decode speed-up"), fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- `countdown bench` tables ----------------------------------------------------------------------

def _num(value: float, fmt: str, dash: str = "—") -> str:
    return dash if value != value else format(value, fmt)


def _gb(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def speed_markdown(points: list[SpeedPoint], title: str = "") -> str:
    """One row per point, grouped by batch size and route, dense first in each group."""
    head = f"**{title}**\n\n" if title else ""
    lines = [
        "| batch | route | method | target | measured | tokens/s per sequence | speed-up vs dense (same batch) | "
        "ideal (bytes, batch 1) | % of ideal | GB/s | GPU GiB | whole call tokens/s: fast loop / countdown.generate | "
        "same tokens as dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        dense = p.method == "dense"
        target = "—" if dense else f"{p.target:.0%}"
        measured = "—" if dense else f"{p.measured:.1%}"
        ideal = _num(p.ideal_speedup, ".2f") + ("×" if p.at_batch_one else "")
        of_ideal = f"{p.speedup / p.ideal_speedup:.0%}" if p.at_batch_one else "—"
        route = p.route or ("compiled" if p.compiled else "—")
        lines.append(f"| {p.batch} | {route} | {p.method} | {target} | {measured} | {p.tokens_per_s:.1f} | "
                     f"{p.speedup:.2f}× | {ideal} | {of_ideal} | {_gb(p.gb_per_s)} | {_num(p.memory_gib, '.2f')} | "
                     f"{_num(p.call_tokens_per_s, '.1f')} / {_num(p.generate_tokens_per_s, '.1f')} | "
                     f"{p.match_dense:.0%} |")
    return head + "\n".join(lines) + "\n"


def routes_markdown(result: BenchResult, title: str = "") -> str:
    """Per configuration at the first batch size: the routes a user can take, memory and prefill."""
    configs = result.configs
    if not configs:
        return ""
    first = result.settings.get("batches", [1])[0]
    pts = {(p.method, p.target): p for p in result.points if p.batch == first}
    names = [c.method if c.method == "dense" else f"{c.method} {c.target:.0%}" for c in configs]
    lines = [f"**{title}**\n" if title else "", "| what a user does | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(configs)]
    d = configs[0]

    def row(label: str, values: list[float], fmt: str, relative: str = "speed") -> None:
        """dense as is; the others as a ratio to dense and the value (speed: higher is better)."""
        cells = [_num(values[0], fmt)]
        for v in values[1:]:
            if v != v or values[0] != values[0]:
                cells.append(_num(v, fmt))
            elif relative == "speed":
                cells.append(f"{v / values[0]:.2f}× ({format(v, fmt)})")
            elif relative == "time":
                cells.append(f"{values[0] / v:.2f}× of dense speed ({format(v, fmt)} ms)")
            else:
                cells.append(f"{format(v, fmt)} ({(v / values[0] - 1):+.1%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    point = [pts.get((c.method, c.target)) for c in configs]
    get = lambda attr: [getattr(p, attr) if p is not None else float("nan") for p in point]  # noqa: E731
    route = "compiled, " if point[0] is not None and point[0].compiled else ""
    row(f"fast loop `Decoder` ({route}batch {first}), decode tokens/s per sequence", get("tokens_per_s"), ".1f")
    row("fast loop, whole call tokens/s (prefill + decode)", get("call_tokens_per_s"), ".1f")
    row(f"`countdown.generate(...{', compile=True' if route else ''})`, whole call tokens/s", get("generate_tokens_per_s"),
        ".1f")
    lines.append("| ... as a share of the fast loop's whole call | " + " | ".join(
        _num(p.generate_tokens_per_s / p.call_tokens_per_s, ".0%") if p is not None else "—" for p in point) + " |")
    if result.settings.get("routes"):
        row(f"plain `model.generate` (greedy, {result.settings.get('route_tokens')} new tokens), tokens/s per sequence",
            [c.model_generate_tokens_per_s for c in configs], ".1f")
    if d.hf_static:
        lines.append("| transformers' recipe: `generate(cache_implementation=\"static\")`, forward compiled "
                     f"`mode=\"reduce-overhead\"` | {d.hf_static} |" + " — |" * (len(configs) - 1))
    row("GPU memory after `sparsify`, GiB (no KV cache)", [c.memory_gib for c in configs], ".2f", "memory")
    n = result.settings.get("prefill_len", 0)
    if n:
        positions = result.settings.get("positions", "decode")
        row(f"forward of a {n}-token prompt, ms (positions=\"{positions}\")", [c.prefill_ms for c in configs], ".1f",
            "time")
        if positions == "decode":
            lines.append("| same, positions=\"all\" (every prompt token sparse) | — | " + " | ".join(
                f"{d.prefill_ms / c.prefill_all_ms:.2f}× of dense speed ({c.prefill_all_ms:.1f} ms)"
                if c.prefill_all_ms == c.prefill_all_ms and d.prefill_ms == d.prefill_ms else "—"
                for c in configs[1:]) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def bench_markdown(result: BenchResult, title: str = "") -> str:
    """The batch table, then the routes / memory / prefill table (last), then what the time limit left out."""
    parts = [speed_markdown(result.points, title)]
    routes = routes_markdown(result, f"routes, memory and prefill at batch {result.settings.get('batches', [1])[0]}")
    if routes:
        parts.append(routes)
    if result.skipped:
        limit = result.settings.get("max_seconds")
        parts.append(f"Left out (time limit{'' if limit is None else f' {limit:.0f}s after model loading'}): "
                     + "; ".join(result.skipped) + "\n")
    return "\n".join(parts)
