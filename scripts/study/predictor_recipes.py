"""D-COUNTDOWN practical predictors on a real model: our recipe beside the official one, low-rank and
ternary "bitlinear", at a few target sparsities.

    PYTHONPATH=. python scripts/study/predictor_recipes.py                    # SmolLM2, CPU, 50/70%, 3 configs
    PYTHONPATH=. python scripts/study/predictor_recipes.py --epochs 3 --configs official:bitlinear --sparsities 0.7

Per (sparsity, recipe, predictor): training wall time (the (x, |t|) collection pass, shared by all, is
timed apart), held-out recall of the true top-(1 − s) neurons by |t| on evaluation text
(`countdown.predictor.predictor_recall`: with the predictor's own top-k, and with logit > 0), and the
perplexity of ``sparsify(model, "d-countdown", s, predictors=...)`` on the first ``--eval-tokens``
evaluation tokens with ``positions="decode"`` (each window's context dense, the scored tokens sparse),
with the sparsity measured there. Our recipe's threshold is the pooled quantile calibrated on the
calibration windows (so its measured sparsity is near the target); the official recipe keeps
logit > 0 (so its sparsity is whatever the classifier gives). Dense and the top-k oracle
(d-countdown-ideal) are the references. Prints a Markdown table last; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import countdown
from countdown.data import calibration_text, document_prefix, evaluation_text, token_stream, token_windows
from countdown.models import ffn_sites
from countdown.predictor import collect_pairs, predictor_recall, train_predictors


def _ppl(model, stream, prefix) -> tuple[float, float]:
    r = countdown.perplexity(model, stream, context=512, positions="decode", prefix=prefix, progress=False)
    return r.ppl, r.sparsity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--configs", default="countdown:lowrank,official:lowrank,official:bitlinear",
                    help="recipe:predictor pairs, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per layer (default: each recipe's)")
    ap.add_argument("--train-windows", type=int, default=16, help="calibration windows of 512 tokens to train on")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    model, tok = countdown.load(args.model)
    prefix = document_prefix(tok)
    calib = token_windows(tok, calibration_text(), 512, max_windows=args.train_windows)
    held_out = token_windows(tok, evaluation_text(), 512, max_windows=max(1, args.eval_tokens // 512))
    stream = token_stream(tok, evaluation_text(), args.eval_tokens, 512)
    t0 = time.time()
    pairs = collect_pairs(model, ffn_sites(model), calib, progress=False)
    collect_s = time.time() - t0
    dense_ppl, _ = _ppl(model, stream, prefix)
    rows = [{"config": "dense", "sparsity_target": 0.0, "ppl": dense_ppl, "sparsity_measured": 0.0}]
    print(f"{args.model}: {calib.numel()} training tokens (collected in {collect_s:.0f}s), dense ppl {dense_ppl:.3f}",
          flush=True)
    for s in [float(v) for v in args.sparsities.split(",")]:
        countdown.sparsify(model, "d-countdown-ideal", s, mode="topk", positions="decode")
        ppl, measured = _ppl(model, stream, prefix)
        countdown.unsparsify(model)
        rows.append({"config": "ideal top-k (oracle)", "sparsity_target": s, "ppl": ppl, "sparsity_measured": measured})
        for config in args.configs.split(","):
            recipe, kind = config.split(":")
            t0 = time.time()
            preds = train_predictors(model, s, pairs=pairs, recipe=recipe, predictor=kind, epochs=args.epochs,
                                     progress=False)
            train_s = time.time() - t0
            rec = predictor_recall(model, preds, held_out, progress=False)
            countdown.sparsify(model, "d-countdown", s, calibration=None if recipe == "official" else calib[:8],
                               predictors=preds, positions="decode", progress=False)
            ppl, measured = _ppl(model, stream, prefix)
            spec = countdown.sparsity_spec(model)
            countdown.unsparsify(model)
            summary = preds.summary()
            row = {"config": f"{recipe} {kind}", "sparsity_target": s, "epochs": args.epochs or "recipe",
                   "rank": summary["rank"], "predictor_fraction": summary["predictor_fraction"],
                   "train_s": train_s, "train_recall_topk": summary["recall_mean"],
                   "heldout": rec.summary(), "recall_topk_per_layer": rec.recall_topk,
                   "recall_zero_per_layer": rec.recall_zero, "sparsity_zero_per_layer": rec.sparsity_zero,
                   "protocol": spec.protocol, "ppl": ppl, "sparsity_measured": measured}
            rows.append(row)
            print(f"  {s:.0%} {recipe} {kind}: trained {train_s:.0f}s, held-out recall top-k "
                  f"{rec.mean('recall_topk'):.3f} logit>0 {rec.mean('recall_zero'):.3f} "
                  f"(sparsity {rec.mean('sparsity_zero'):.3f}), ppl {ppl:.3f} at measured sparsity {measured:.3f} "
                  f"[{spec.protocol}]", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "train_tokens": calib.numel(), "collect_s": collect_s,
                                        "eval_tokens": int(stream.numel()), "threads": torch.get_num_threads(),
                                        "rows": rows}, indent=1))
    print(f"\n{args.model}, CPU ({torch.get_num_threads()} threads), {calib.numel()} training tokens "
          f"(calibration text), {stream.numel()} evaluation tokens, positions=decode; total {time.time() - t_start:.0f}s\n")
    print("| target | config | rank | pred/FFN | train s | recall top-k | recall logit>0 | prec. logit>0 "
          "| sparsity (measured) | ppl | Δppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = r.get("heldout")
        cells = [f"{r['sparsity_target']:.0%}", r["config"], str(r.get("rank", "")),
                 f"{r['predictor_fraction']:.1%}" if h else "", f"{r['train_s']:.0f}" if h else "",
                 f"{h['recall_topk_mean']:.3f}" if h else "", f"{h['recall_zero_mean']:.3f}" if h else "",
                 f"{h['precision_zero_mean']:.3f}" if h else "", f"{r['sparsity_measured']:.3f}",
                 f"{r['ppl']:.2f}", f"{r['ppl'] - dense_ppl:+.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
