"""How the union of kept FFN neurons grows with the decode batch, on a real model's activations.

    PYTHONPATH=. python scripts/study/union_growth.py                       # SmolLM2, CPU, M-COUNTDOWN 70/90%, D-COUNTDOWN 90%
    PYTHONPATH=. python scripts/study/union_growth.py --model qwen2.5-coder-0.5b --windows 32

Thresholds are calibrated on the calibration text; the masks are recorded on 16+ evaluation windows
(one sequence each) and grouped B sequences at a time at the same position, as a decode batch holds
them. Beside each measured union stands the independent-masks value 1 − s^B (what random weights
give). Prints a Markdown table last; with $OUT set, writes union_growth.json there.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import countdown
from countdown.data import calibration_text, evaluation_text, first_tokens
from countdown.union import union_growth

POINTS = (("m-countdown", 0.7), ("m-countdown", 0.9), ("d-countdown-ideal", 0.9), ("d-countdown", 0.9))
BATCH = (1, 2, 4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    t0 = time.time()
    model, tok = countdown.load(args.model)
    calib = first_tokens(tok, calibration_text(), 8 * 256, 256)
    windows = first_tokens(tok, evaluation_text(), args.windows * args.seq, args.seq)
    rows = []
    for method, s in POINTS:
        preds = countdown.train_predictors(model, s, calib, progress=False) if method == "d-countdown" else None
        countdown.sparsify(model, method, s, calibration=calib, positions="all", predictors=preds, progress=False)
        r = union_growth(model, windows, BATCH)
        countdown.unsparsify(model)
        rows.append({"method": method, "target": s, **r})
        print(f"{method} {s:.0%}: " + " ".join(f"B={b}: {k:.2f}" for b, k in zip(BATCH, r["kept"])), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "union_growth.json"), "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=1)
    print(f"\n{args.model}: union kept fraction of a decode batch (measured | independent masks 1−s^B), "
          f"{args.windows} sequences × {args.seq} positions, thresholds calibrated, {time.time() - t0:.0f}s\n")
    print("| method | target | " + " | ".join(f"B={b}" for b in BATCH) + " |")
    print("|---|---|" + "---|" * len(BATCH))
    for r in rows:
        cells = [f"{k:.2f} \\| {i:.2f}" for k, i in zip(r["kept"], r["independent"])]
        print(f"| {r['method']} | {r['target']:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
