"""The seed papers' metrics on the built-in real models (issue 28 item 4): natural activation sparsity of
the FFN coefficients (Lazy Neuron, `countdown.natural_sparsity`) and Sparsing Law's PPL-p% sparsity per
method (`countdown.ppl_sparsity`). One JSON line per result, appended to --out (re-running skips what the
file already has); --tables prints the Markdown tables of docs/STUDY.md §10 from that file.

    PYTHONPATH=. python scripts/study/seed_metrics.py --models smollm2,gemma3-270m,qwen2.5-coder-0.5b \
        --out bench/results/seed-metrics-2026-12-08.jsonl
    PYTHONPATH=. python scripts/study/seed_metrics.py --tables bench/results/seed-metrics-2026-12-08.jsonl

Protocol (what `countdown run` does, positions=decode): calibration = the first --calib-windows × 512
tokens of the default corpus's calibration part (thresholds: threshold mode, the "pooled" rule, one
calibration pass reused by every probe; TEAL model-wide recalibrates per probe because its attention
thresholds come from the same pass); perplexity = --eval-tokens tokens of the evaluation part in windows
of 512 sliding by 256, each scoring its last 256 tokens with the context dense (`countdown.perplexity`).
Natural sparsity: every position of --natural-windows windows of 512 evaluation tokens, the model dense.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from countdown.data import calibration_text, document_prefix, evaluation_text, first_tokens, token_stream
from countdown.loading import load
from countdown.natural_sparsity import natural_sparsity
from countdown.ppl_sparsity import ppl_p_sparsity

METHODS = {  # label: (method, model-wide)
    "teal-model-wide": ("teal", True),
    "teal-ffn": ("teal", False),
    "m-countdown": ("m-countdown", False),
    "cats": ("cats", False),
    "chess": ("chess", False),
}


def _done(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["model"], r["kind"], r.get("method", "")) for r in rows}


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("per_layer", "probes")})[:400], flush=True)


def run(args) -> None:
    out = Path(args.out)
    for name in args.models.split(","):
        done = _done(out)
        methods = args.methods.split(",") if name in args.ppl_models.split(",") else []
        todo = [label for label in methods if (name, "ppl-p", label) not in done]
        if args.skip_natural:
            done.add((name, "natural", ""))
        if (name, "natural", "") in done and not todo:
            continue
        t0 = time.time()
        model, tok = load(name, device="cpu", dtype="float32")
        print(f"loaded {name} in {time.time() - t0:.0f}s", flush=True)
        prefix = document_prefix(tok)
        if (name, "natural", "") not in done:
            t0 = time.time()
            windows = first_tokens(tok, evaluation_text(), args.natural_windows * 512, 512)
            r = natural_sparsity(model, windows, prefix=prefix)
            _append(out, dict(model=name, kind="natural", n_tokens=r.n_tokens, intermediate_size=r.intermediate_size,
                              summary=r.summary(), per_layer={"zeros": r.zeros,
                                                              **{f"below_{e:g}": v for e, v in r.below.items()},
                                                              **{f"mass_{q:g}": v for q, v in r.mass.items()}},
                              seconds=time.time() - t0))
        calib = first_tokens(tok, calibration_text(), args.calib_windows * 512, 512)
        eval_ids = token_stream(tok, evaluation_text(), args.eval_tokens, 512)
        dense_ppl = None
        for label in todo:
            method, wide = METHODS[label]
            t0 = time.time()
            brackets, probes, dense_ppl = ppl_p_sparsity(
                model, method, calib, eval_ids, increases=(0.01, 0.05), model_wide=wide, high=args.high,
                steps=args.steps, prefix=prefix, dense_ppl=dense_ppl, log=lambda s: print("  " + s, flush=True))
            _append(out, dict(model=name, kind="ppl-p", method=label, dense_ppl=dense_ppl, eval_tokens=int(eval_ids.numel()),
                              calib_tokens=int(calib.numel()), steps=args.steps, high=args.high,
                              brackets={f"{p:g}": dict(below=b.below and b.below.__dict__, above=b.above and b.above.__dict__,
                                                       estimate=b.estimate) for p, b in brackets.items()},
                              probes=[q.__dict__ for q in probes], seconds=time.time() - t0))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def _bracket(b: dict) -> str:
    lo, hi = b["below"], b["above"]
    if hi is None:
        return f"≥ {_pct(lo['target'])} (not reached)"
    if lo is None:
        return f"< {_pct(hi['target'])}"
    return (f"**{_pct(b['estimate'])}** [{_pct(lo['target'])} ({lo['increase']:+.1%}), "
            f"{_pct(hi['target'])} ({hi['increase']:+.1%})]")


def tables(paths: list[Path]) -> str:
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    natural = [r for r in rows if r["kind"] == "natural"]
    lines = ["### Natural sparsity of the FFN coefficients (dense model, every position)", "",
             "Mean over layers [lowest layer, highest layer] of the fraction of coefficients t (the down "
             "projection's input) per measure.", "",
             "| model | tokens | exactly 0 (fraction) | abs(t) ≤ 0.01·mean | abs(t) ≤ 0.1·mean | abs(t) ≤ 0.5·mean | droppable at 90% L1 mass | at 99% L1 mass |",
             "|---|---|---|---|---|---|---|---|"]
    for r in natural:
        s = r["summary"]
        cells = [f"{s['zeros'][0]:.1g} [{s['zeros'][1]:.1g}, {s['zeros'][2]:.1g}]"]  # a fraction, not %: ~1e-8
        cells += [f"{s[k][0]:.1%} [{s[k][1]:.1%}, {s[k][2]:.1%}]" for k in
                  ("below_0.01", "below_0.1", "below_0.5", "mass_0.9", "mass_0.99")]
        lines.append(f"| {r['model']} | {r['n_tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "### PPL-p% sparsity (Sparsing Law): target sparsity at which perplexity rises by p% over dense", "",
              "Estimate (linear between the bracket's ends) in bold, then the bracket: the highest probed target "
              "within p and the lowest over it, each with its perplexity change. Threshold mode, positions=decode.", "",
              "| model | dense ppl | method | PPL-1% | PPL-5% | probes |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "ppl-p"):
        lines.append(f"| {r['model']} | {r['dense_ppl']:.3f} | {r['method']} | {_bracket(r['brackets']['0.01'])} | "
                     f"{_bracket(r['brackets']['0.05'])} | {len(r['probes'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,gemma3-270m,qwen2.5-coder-0.5b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-natural", action="store_true", help="PPL-p%% only (natural sparsity run elsewhere).")
    ap.add_argument("--ppl-models", default="smollm2,gemma3-270m,qwen2.5-coder-0.5b",
                    help="The models of --models that also get PPL-p%% (the others: natural sparsity only).")
    ap.add_argument("--out", default="runs/seed-metrics.jsonl")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--natural-windows", type=int, default=4)
    ap.add_argument("--high", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tables", default=None, help="Print the Markdown tables of these results files (comma-separated) and exit.")
    args = ap.parse_args()
    if args.tables:
        print(tables([Path(p) for p in args.tables.split(",")]))
        return
    run(args)


if __name__ == "__main__":
    main()
