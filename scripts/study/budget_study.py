"""Uniform against searched sparsity allocations at EQUAL bytes read per decode step (docs/STUDY.md §9).

For each configuration (TEAL 40%/50% model-wide, M-COUNTDOWN 50%/70%, CHESS 50%/70%) the uniform
allocation fixes the bytes; TEAL's block-wise greedy (`countdown.budget.greedy_allocation`) and the
sensitivity knapsack (`countdown.budget.sensitivity_allocation`) find allocations reading the same
bytes. Each is installed with `countdown.sparsify` (pooled thresholds calibrated per (layer, site) on
calibration text) and scored on held-out text under the decode protocol.

    PYTHONPATH=. python scripts/study/budget_study.py --model smollm2 --out runs/budget/smollm2
    # a machine without the corpora (the GPU machine): tokenise here, score there
    PYTHONPATH=. python scripts/study/budget_study.py --model smollm2 --save-tokens runs/budget/smollm2.pt
    python scripts/study/budget_study.py --model /path/model.gguf --tokens smollm2.pt --device cuda --out DIR
    PYTHONPATH=. python scripts/study/budget_study.py --table runs/budget/*/results.jsonl   # the markdown table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONFIGS = [("teal", True, 0.4), ("teal", True, 0.5), ("m-countdown", False, 0.5), ("m-countdown", False, 0.7),
           ("chess", False, 0.5), ("chess", False, 0.7)]
SEARCHES = ("uniform", "greedy", "sensitivity")


def tokens(model_name: str, calib_windows: int, search_windows: int, search_len: int, eval_tokens: int,
           context: int, tok=None) -> dict:
    from countdown import data
    from countdown.loading import load

    if tok is None:
        _, tok = load(model_name, device="cpu")
    calib_text = data.calibration_text("default")
    calib = data.first_tokens(tok, calib_text, calib_windows * context, context)
    search = data.first_tokens(tok, calib_text, search_windows * search_len, search_len)
    evaluation = data.token_stream(tok, data.evaluation_text("default"), eval_tokens, context)
    return {"calib": calib, "search": search, "eval": evaluation, "prefix": data.document_prefix(tok),
            "context": context}


def run(args) -> None:
    import countdown
    from countdown import budget
    from countdown.loading import load

    toks = torch.load(args.tokens) if args.tokens else None
    model, tok = load(args.model, device=args.device, dtype="float32")
    if toks is None:
        toks = tokens(args.model, args.calib_windows, args.search_windows, args.search_len, args.eval_tokens,
                      args.context, tok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = {(r["method"], r["attention"], r["sparsity"], r["search"]): r for r in map(json.loads, results.read_text()
            .splitlines())} if results.is_file() else {}
    done = set(rows)
    common = {"context": toks["context"], "positions": "decode", "prefix": toks["prefix"], "progress": False}
    dense = countdown.perplexity(model, toks["eval"], **common)
    print(f"dense ppl {dense.ppl:.4f} on {dense.n_tokens} tokens", flush=True)
    wanted = [float(x) for x in args.sparsities.split(",")] if args.sparsities else None
    configs = [c for c in CONFIGS if c[0] in args.methods.split(",") and (wanted is None or c[2] in wanted)]
    profiles = {}
    for method, attention, s in configs:
        bm = budget.byte_model(model, method, attention)
        fraction = bm.fraction(bm.uniform_at(s))
        for how in args.searches.split(","):
            if (method, attention, s, how) in done:
                continue
            if how == "greedy" and len(bm.sites) == 1 and (method, attention, s, "uniform") in rows:
                # one site per block: the block-wise greedy is the uniform allocation (exactly its results)
                row = {**rows[(method, attention, s, "uniform")], "search": "greedy", "summary": "= uniform"}
                _append(results, row)
                continue
            t0 = time.time()
            if how == "uniform":
                alloc = None
            elif how == "greedy":
                alloc = budget.greedy_allocation(model, method, fraction, toks["search"], attention=attention,
                                                 step=args.greedy_step)
            else:
                key = (method, attention)
                if key not in profiles:
                    profiles[key] = budget.sensitivity_profile(model, method, toks["search"], attention=attention,
                                                               grid=[float(g) for g in args.grid.split(",")])
                alloc = budget.knapsack_allocation(profiles[key], bm, fraction)
            search_s = time.time() - t0
            sparsity = s if alloc is None else alloc
            countdown.sparsify(model, method, sparsity, calibration=toks["calib"], attention=s if attention and
                               alloc is None else None, positions="decode", max_windows=None, progress=False,
                               kernels="off")
            r = countdown.perplexity(model, toks["eval"], **common)
            countdown.unsparsify(model)
            row = {"model": args.name or args.model, "method": method, "attention": attention, "sparsity": s,
                   "search": how, "bytes": fraction, "bytes_measured": bm.measured_fraction({**r.site_sparsity, **r.attention_sparsity}),
                   "ppl": r.ppl, "dense_ppl": dense.ppl, "delta_pct": 100 * (r.ppl / dense.ppl - 1),
                   "n_tokens": r.n_tokens, "search_seconds": search_s, "device": str(next(model.parameters()).device),
                   "allocation": None if alloc is None else alloc.to_meta(),
                   "summary": "uniform" if alloc is None else alloc.summary()}
            rows[(method, attention, s, how)] = row
            _append(results, row)
            print(f"{method} {'+attn ' if attention else ''}{s:.0%} {how}: bytes {fraction:.3f} "
                  f"(measured {row['bytes_measured']:.3f}) ppl {r.ppl:.3f} ({row['delta_pct']:+.1f}%) "
                  f"search {search_s:.0f}s", flush=True)


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def table(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    by = {}
    for r in rows:
        by[(r["model"], r["method"], r["attention"], r["sparsity"], r["search"])] = r
    lines = [("| model | configuration | bytes read (of dense step) | uniform Δppl | greedy Δppl | sensitivity Δppl "
              "| sensitivity vs uniform |"), "|---|---|---|---|---|---|---|"]
    for (model, method, attention, s, how), r in sorted(by.items()):
        if how != "uniform":
            continue
        name = f"{'TEAL' if method == 'teal' else method.upper() if method == 'chess' else 'M-COUNTDOWN'} {s:.0%}" + \
               (" model-wide" if attention else "")
        cells = {h: by.get((model, method, attention, s, h)) for h in SEARCHES}
        fmt = {h: (f"{c['delta_pct']:+.1f}% ({c['bytes_measured']:.3f})" if c else "—") for h, c in cells.items()}
        gain = "—"
        if cells["sensitivity"] and cells["uniform"]["delta_pct"] > 0:
            gain = f"{1 - cells['sensitivity']['delta_pct'] / cells['uniform']['delta_pct']:.1%} less"
        lines.append(f"| {model} | {name} | {r['bytes']:.3f} | {fmt['uniform']} | {fmt['greedy']} | "
                     f"{fmt['sensitivity']} | {gain} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--name", default=None, help="the model's name in the table (default: --model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="teal,m-countdown,chess")
    p.add_argument("--searches", default=",".join(SEARCHES))
    p.add_argument("--sparsities", default=None, help="only these of the configurations' sparsities")
    p.add_argument("--greedy-step", type=float, default=0.01, help="bytes per greedy step, of the block's")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--search-windows", type=int, default=4)
    p.add_argument("--search-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--grid", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="sensitivity grid")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--tokens", default=None, help="pre-tokenised text from --save-tokens")
    p.add_argument("--save-tokens", default=None)
    p.add_argument("--out", default="runs/budget")
    p.add_argument("--table", nargs="*", default=None, help="print the markdown table of these results.jsonl")
    args = p.parse_args()
    if args.table is not None:
        print(table(args.table))
    elif args.save_tokens:
        t = tokens(args.model, args.calib_windows, args.search_windows, args.search_len, args.eval_tokens, args.context)
        Path(args.save_tokens).parent.mkdir(parents=True, exist_ok=True)
        torch.save(t, args.save_tokens)
        print({k: tuple(v.shape) if hasattr(v, "shape") else v for k, v in t.items()})
    else:
        run(args)


if __name__ == "__main__":
    main()
