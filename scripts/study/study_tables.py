"""The tables of docs/STUDY.md from the study's sweep folders (issue 12).

    PYTHONPATH=. python scripts/study/study_tables.py runs/study        # Markdown to stdout, plots to docs/study/
    PYTHONPATH=. python scripts/study/study_tables.py runs/study --tasks runs/study-tasks   # + task accuracy
    PYTHONPATH=. python scripts/study/study_tables.py runs/study --tasks runs/study-tasks --write docs/STUDY.md

``--write`` replaces what lies between the ``<!-- study_tables:begin -->`` and ``<!-- study_tables:end -->``
lines of that file, so the prose around the tables stays where it is.

Each folder runs/study/<model>/<mode>-<positions>/ is one `countdown sweep` (see docs/STUDY.md for the
commands). A row is (method, target); the columns are the four protocols side by side: top-k or
threshold mode, with every position sparse ("all") or the official context-dense / continuation-sparse
rule ("decode"). Perplexities are relative to the dense model of the same protocol, whose windows
score the same tokens. D-COUNTDOWN practical's predictor recall comes from predictors_<s>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from countdown.report import plot_ppl_vs_sparsity
from countdown.sweep import load_points

PROTOCOLS = (("topk", "decode"), ("topk", "all"), ("threshold", "decode"), ("threshold", "all"))
TITLES = {
    "gemma3-270m": "Gemma-3-270M (Q4_K_M GGUF; GeGLU, gelu-tanh)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF; SwiGLU)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF; SwiGLU; 1024 evaluation tokens)",
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF; SwiGLU)",
}
BEGIN, END = "<!-- study_tables:begin -->", "<!-- study_tables:end -->"
ORDER = ("cats", "teal", "m-countdown", "d-countdown-ideal", "d-countdown", "dejavu", "s-countdown", "dhar",
         "chess", "wina", "r-sparse")


def _cell(point, dense, show_measured: bool) -> str:
    if point is None:
        return "—"
    rel = point.ppl / dense - 1
    text = f"{point.ppl:.3g} ({rel:+.0%})" if point.ppl < 1e4 else f"{point.ppl:.2e}"
    return f"{text} @{point.measured:.0%}" if show_measured else text


def model_table(folder: Path) -> tuple[str, dict]:
    runs = {}
    for mode, positions in PROTOCOLS:
        points = load_points(folder / f"{mode}-{positions}" / "results.jsonl")
        if points:
            runs[(mode, positions)] = points
    present = [p for p in PROTOCOLS if p in runs]
    dense = {p: next(x.ppl for x in runs[p] if x.method == "dense") for p in present}
    by_key = {p: {(x.method, round(x.target, 3)): x for x in runs[p] if x.method != "dense"} for p in present}
    rows = sorted({k for p in present for k in by_key[p]}, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1]))
    head = "| method | target | " + " | ".join(f"{m} {pos}" for m, pos in present) + " | FFN bytes read |"
    lines = [head, "|" + "---|" * (3 + len(present)),
             "| dense | — | " + " | ".join(f"{dense[p]:.3f}" for p in present) + " | 100% |"]
    for key in rows:
        cells = [_cell(by_key[p].get(key), dense[p], p[0] == "threshold") for p in present]
        any_point = next(by_key[p][key] for p in present if key in by_key[p])
        lines.append(f"| {key[0]} | {key[1]:.0%} | " + " | ".join(cells) + f" | {any_point.ffn_bytes_read:.0%} |")
    recall = {}
    for p in present:
        for f in sorted((folder / f"{p[0]}-{p[1]}").glob("predictors_*.json")):
            s = json.loads(f.read_text())["summary"]
            recall[f.stem.split("_")[1]] = (s["recall_mean"], s["recall_min"], s["rank"], s["predictor_fraction"])
    return "\n".join(lines) + "\n", {"runs": runs, "recall": recall, "present": present}


def headline_table(infos: dict[str, dict], targets=(0.5, 0.7, 0.9)) -> str:
    """Every method on every model under the paper's protocol (top-k, official positions): the change
    in perplexity against dense, one column per (model, target); perplexities past 1000 as they are."""
    models = [m for m, info in infos.items() if ("topk", "decode") in info["runs"]]
    by_model = {}
    for m in models:
        pts = infos[m]["runs"][("topk", "decode")]
        by_model[m] = ({(p.method, round(p.target, 3)): p for p in pts if p.method != "dense"},
                       next(p.ppl for p in pts if p.method == "dense"))
    head = "| method | " + " | ".join(f"{m} {t:.0%}" for m in models for t in targets) + " |"
    lines = [head, "|" + "---|" * (1 + len(models) * len(targets))]
    methods = [m for m in ORDER if any((m, t) in by_model[x][0] for x in models for t in targets)]
    for method in methods:
        cells = []
        for m in models:
            points, dense = by_model[m]
            for t in targets:
                p = points.get((method, t))
                cells.append("—" if p is None else f"{p.ppl / dense - 1:+.0%}" if p.ppl < 1e3 else f"ppl {p.ppl:.0e}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recall_table(infos: dict[str, dict]) -> str:
    """D-COUNTDOWN practical: each model's predictor recall per target (from the top-k decode run)."""
    rows = []
    for model, info in infos.items():
        folder = info["folder"] / "topk-decode"
        recall = {}
        for f in sorted(folder.glob("predictors_*.json")):
            recall[int(f.stem.split("_")[1])] = json.loads(f.read_text())["summary"]
        if recall:
            rows.append((model, recall))
    if not rows:
        return ""
    targets = sorted({t for _, r in rows for t in r})
    lines = ["| model | rank (FFN share) | " + " | ".join(f"recall {t}% (min layer)" for t in targets) + " |",
             "|" + "---|" * (2 + len(targets))]
    for model, recall in rows:
        any_s = next(iter(recall.values()))
        cells = [f"{recall[t]['recall_mean']:.3f} ({recall[t]['recall_min']:.3f})" if t in recall else "—"
                 for t in targets]
        lines.append(f"| {model} | {any_s['rank']} ({any_s['predictor_fraction']:.1%}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def task_table(root: Path) -> str:
    """Task accuracy per model and method from runs/study-tasks/<model>/results.jsonl."""
    lines = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        points = load_points(folder / "results.jsonl")
        if not points:
            continue
        tasks = list(dict.fromkeys(t for p in points for t in p.extra))
        dense = next(p for p in points if p.method == "dense")
        lines += [f"\n{folder.name} (dense ppl {dense.ppl:.2f}, {dense.n_tokens} tokens)\n",
                  "| method | target | ppl | " + " | ".join(t.replace("countdown_bigbench_", "") for t in tasks) + " |",
                  "|" + "---|" * (3 + len(tasks))]
        for p in sorted(points, key=lambda p: ORDER.index(p.method) if p.method in ORDER else -1):
            accs = [f"{p.extra[t]['acc']:.2f} ± {p.extra[t]['acc_stderr']:.2f}" if t in p.extra else "—" for t in tasks]
            rel = "" if p.method == "dense" else f" ({p.ppl / dense.ppl - 1:+.0%})"
            lines.append(f"| {p.method} | {p.target:.0%} | {p.ppl:.3g}{rel} | " + " | ".join(accs) + " |")
    return "\n".join(lines) + "\n"


def grid_table(root: Path, tasks: Path | None) -> str:
    """What was run: one row per sweep folder, with its methods, targets, points and summed wall time."""
    lines = ["| model | protocol | methods | targets | points | wall (min) |", "|---|---|---|---|---|---|"]
    folders = [(m.name, f"{mode} {pos}", m / f"{mode}-{pos}") for m in sorted(p for p in root.iterdir() if p.is_dir())
               for mode, pos in PROTOCOLS]
    if tasks is not None and tasks.is_dir():
        folders += [(m.name, "tasks (top-k decode)", m) for m in sorted(p for p in tasks.iterdir() if p.is_dir())]
    for model, protocol, folder in folders:
        every = load_points(folder / "results.jsonl")
        points = [p for p in every if p.method != "dense"]
        if not points:
            continue
        methods = [m for m in ORDER if any(p.method == m for p in points)]
        names = "all 11" if len(methods) == len(ORDER) else ", ".join(methods)
        targets = "/".join(f"{t:.0%}".rstrip("%") for t in sorted({round(p.target, 3) for p in points})) + "%"
        minutes = sum(p.seconds for p in every) / 60
        lines.append(f"| {model} | {protocol} | {names} | {targets} | {len(points)} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def render(root: Path, tasks: Path | None, plots: Path) -> str:
    """The whole generated part of docs/STUDY.md (and the plots, written to ``plots``)."""
    plots.mkdir(parents=True, exist_ok=True)
    out, infos = [], {}
    out += ["### What was run\n", "Summed over each folder's points (model loading not counted).\n",
            grid_table(root, tasks)]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        table, info = model_table(folder)
        infos[folder.name] = {**info, "folder": folder}
        scored = {f"{m} {pos}": next(x.n_tokens for x in info["runs"][(m, pos)] if x.method == "dense")
                  for m, pos in info["present"]}
        out.append(f"\n### {TITLES.get(folder.name, folder.name)}\n")
        if ("topk", "decode") in info["runs"]:
            points = info["runs"][("topk", "decode")]
            rel = plots.name
            out.append(f"![{folder.name}]({rel}/{folder.name}_topk_decode.png) "
                       f"![{folder.name} bytes]({rel}/{folder.name}_topk_decode_bytes.png)\n")
            plot_ppl_vs_sparsity(points, plots / f"{folder.name}_topk_decode.png",
                                 title=f"{folder.name}: perplexity vs sparsity (top-k, official positions)")
            plot_ppl_vs_bytes(points, plots / f"{folder.name}_topk_decode_bytes.png",
                              title=f"{folder.name}: perplexity vs FFN weight bytes read (top-k, official positions)")
        out.append("Tokens scored: " + ", ".join(f"{k} {v}" for k, v in scored.items()) + ".\n")
        out.append(table)
        if info["recall"]:
            out.append("D-COUNTDOWN practical predictors: " + "; ".join(
                f"{s}%: recall mean {r[0]:.3f} (min {r[1]:.3f}), rank {r[2]}, {r[3]:.1%} of FFN weights"
                for s, r in sorted(info["recall"].items())) + "\n")
    out += ["\n### Every model, top-k, official positions: perplexity change against dense\n", headline_table(infos),
            "\n### D-COUNTDOWN practical predictor recall\n", recall_table(infos)]
    if tasks is not None and tasks.is_dir():
        out += ["\n### Task accuracy (official protocol: top-k, context dense, continuation sparse)\n", task_table(tasks)]
    return "\n".join(out)


def write_between_markers(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + text.strip("\n") + "\n" + END + rest.split(END, 1)[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path, nargs="?", default=Path("runs/study"))
    ap.add_argument("--plots", type=Path, default=Path("docs/study"))
    ap.add_argument("--tasks", type=Path, default=None, help="runs/study-tasks: task accuracy per model")
    ap.add_argument("--write", type=Path, default=None, help="replace the generated block of this Markdown file")
    args = ap.parse_args()
    text = render(args.root, args.tasks, args.plots)
    if args.write is None:
        print(text)
    else:
        write_between_markers(args.write, text)


def plot_ppl_vs_bytes(points, path: Path, title: str) -> None:
    """Perplexity against the FFN bytes a kernel reads: methods compared at equal cost, not equal sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = next(p.ppl for p in points if p.method == "dense")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({dense:.2f})")
    for i, method in enumerate(dict.fromkeys(p.method for p in points if p.method != "dense")):
        pts = sorted((p for p in points if p.method == method), key=lambda p: p.ffn_bytes_read)
        ax.plot([100 * p.ffn_bytes_read for p in pts], [p.ppl for p in pts], marker="os^"[i // 10],
                color=f"C{i % 10}", linestyle="-" if i < 10 else "--", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("FFN weight bytes read per token, % of dense")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
