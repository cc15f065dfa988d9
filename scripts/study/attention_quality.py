"""Quality of attention-projection input sparsity on a real model (issue 13), CPU is fine.

    PYTHONPATH=. python scripts/study/attention_quality.py                 # SmolLM2, float32
    PYTHONPATH=. python scripts/study/attention_quality.py --model qwen2.5-coder-0.5b

Perplexity (strict protocol: every position sparse, pooled thresholds calibrated on the calibration
text) for attention inputs 0/25/40/50% combined with M-COUNTDOWN 50/70%, and TEAL model-wide
25/40/50% (FFN and attention at one sparsity), with the measured sparsities and the fraction of the
model's weight bytes a decode step would read. Markdown table last; JSON to $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import countdown
from countdown.data import calibration_text, document_prefix, evaluation_text, first_tokens, token_stream
from countdown.speed import model_bytes

GRID = [("m-countdown", s, a) for s in (0.5, 0.7) for a in (0.0, 0.25, 0.4, 0.5)] + \
       [("teal", s, s) for s in (0.25, 0.4, 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--json", help="Write the rows here (default: $OUT/attention_quality.json if $OUT is set).")
    args = ap.parse_args()
    t0 = time.time()
    model, tok = countdown.load(args.model)
    calib = first_tokens(tok, calibration_text(), 4 * 512, 512)
    ids = token_stream(tok, evaluation_text(), args.eval_tokens, 512)
    prefix = document_prefix(tok)
    nb = model_bytes(model)
    dense = countdown.perplexity(model, ids, positions="all", prefix=prefix, progress=False)
    rows = []
    for method, s, a in GRID:
        countdown.sparsify(model, method, s, calibration=calib, attention=a, positions="all", progress=False)
        r = countdown.perplexity(model, ids, prefix=prefix, progress=False)
        countdown.unsparsify(model)
        read = nb.per_token(0, r.ffn_bytes_read, 0, r.attention_sparsity) / nb.per_token(0)
        rows.append({"method": method, "ffn": s, "attention": a, "ppl": r.ppl, "delta": r.ppl - dense.ppl,
                     "measured_ffn": r.sparsity, "ffn_sites": r.site_sparsity, "ffn_bytes_read": r.ffn_bytes_read,
                     "measured_attention": r.attention_sparsity, "bytes_read": read})
        print(json.dumps(rows[-1]), flush=True)
    out = args.json or (os.path.join(os.environ["OUT"], "attention_quality.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump({"model": args.model, "dense_ppl": dense.ppl, "rows": rows}, f, indent=1)
    print(f"\n{args.model}: perplexity on {dense.n_tokens} tokens (positions=all, pooled thresholds), dense "
          f"{dense.ppl:.3f}; {time.time() - t0:.0f}s\n")
    print("| method | FFN target | attention inputs | measured FFN | measured qkv / o | ppl | Δppl | weight bytes read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        att = r["measured_attention"]
        cell = f"{att['qkv']:.0%} / {att['o']:.0%}" if att else "—"
        print(f"| {r['method']} | {r['ffn']:.0%} | {r['attention']:.0%} | {r['measured_ffn']:.1%} | {cell} | "
              f"{r['ppl']:.3f} | {r['delta']:+.3f} | {r['bytes_read']:.0%} |")


if __name__ == "__main__":
    main()
