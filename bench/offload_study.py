"""Real-model statistics behind `countdown.offload` (CPU): hot-neuron hit rates and lookahead recall.

For each installed built-in model (SmolLM2 always; Qwen2.5-Coder-0.5B and Gemma-3-270M when installed):

1. Hot neurons: M-COUNTDOWN 70%, CATS 50%, D-COUNTDOWN 90% (threshold mode, calibrated on the
   calibration split; D-COUNTDOWN with predictors trained on it); keep frequencies on calibration text,
   resident sets of 25% / 50% of all FFN neurons (offload's global rule, and equal per-layer shares),
   hit rate (fraction of kept neurons, per token, that are resident) on the evaluation split.
2. Lookahead: D-COUNTDOWN predictors trained on the FFN input (in place), on the layer's attention input
   and on the previous layer's FFN input (DejaVu), same recipe; recall of the true top-(1 − s) by |t| on
   the evaluation split, and perplexity with top-k masks at every position.

    PYTHONPATH=. python bench/offload_study.py --out /tmp/offload_study.json [--models smollm2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import countdown
from countdown import assets
from countdown.data import calibration_text, document_prefix, evaluation_text, first_tokens, token_stream
from countdown.hot import hit_rates, keep_frequencies, resident_sets
from countdown.lookahead import collect_lookahead_pairs, remove_lookahead, train_lookahead, use_lookahead
from countdown.predictor import _labels, _recall_counts, _Counts, logits_of

HOT_CONFIGS = (("m-countdown", 0.7), ("cats", 0.5), ("d-countdown", 0.9))
FRACTIONS = (0.25, 0.5)


def recall_on(pairs, predictors, sparsity):
    xs, ts = pairs
    per_layer = []
    for layer, x, t in zip(predictors, xs, ts):
        c = _Counts()
        c.add(_recall_counts(logits_of({k: v.float() for k, v in layer.items()}, x), _labels(t, sparsity), sparsity))
        per_layer.append(c.metrics()["recall"])
    return per_layer


def study(name: str, args) -> dict:
    model, tok = countdown.load(name, device="cpu", dtype="float32")
    calib = first_tokens(tok, calibration_text(), args.calib_tokens, args.seq_len)
    held = first_tokens(tok, evaluation_text(), args.eval_tokens, args.seq_len)
    ppl_ids = token_stream(tok, evaluation_text(), args.ppl_tokens, args.seq_len)
    out: dict = {"model": name, "calib_windows": list(calib.shape), "eval_windows": list(held.shape)}
    t0 = time.time()
    preds = {}
    if "lookahead" in args.parts:
        out["lookahead"], preds = lookahead_part(name, model, tok, calib, held, ppl_ids, args, out)
    if "hot" in args.parts:
        out["hot"] = hot_part(name, model, calib, held, args, preds)
    out["seconds"] = time.time() - t0
    return out


def lookahead_part(name, model, tok, calib, held, ppl_ids, args, out):
    pairs_ffn = collect_lookahead_pairs(model, calib, "ffn")
    pairs_att = collect_lookahead_pairs(model, calib, "attention")
    eval_ffn = collect_lookahead_pairs(model, held, "ffn")
    eval_att = collect_lookahead_pairs(model, held, "attention")

    def previous(p_ffn, p_att):
        return [p_att[0][0]] + p_ffn[0][:-1], p_ffn[1]

    train = {"ffn": pairs_ffn, "attention": pairs_att, "previous": previous(pairs_ffn, pairs_att)}
    evals = {"ffn": eval_ffn, "attention": eval_att, "previous": previous(eval_ffn, eval_att)}
    preds = {}
    look = {}
    for s in args.lookahead_sparsities:
        for source in ("ffn", "attention", "previous"):
            p = train_lookahead(model, s, pairs=train[source], epochs=args.epochs)
            preds[(source, s)] = p
            rec = recall_on(evals[source], p, s)
            look[f"{source}@{s}"] = {"recall_eval_mean": sum(rec) / len(rec), "recall_eval_min": min(rec),
                                     "recall_eval_per_layer": rec, "recall_train_holdout_mean": p.summary()["recall_mean"]}
            print(f"{name} lookahead {source:9s} s={s}: recall (eval text) {sum(rec) / len(rec):.3f} "
                  f"min {min(rec):.3f}; held-out calib {p.summary()['recall_mean']:.3f}", flush=True)
    del pairs_ffn, pairs_att, eval_ffn, eval_att, train, evals
    prefix = document_prefix(tok)
    dense_ppl = countdown.perplexity(model, ppl_ids, context=args.seq_len, prefix=prefix, progress=False).ppl
    out["dense_ppl"] = dense_ppl
    for s in args.lookahead_sparsities:
        for source in ("ffn", "attention", "previous"):
            countdown.sparsify(model, "d-countdown", s, predictors=preds[(source, s)], mode="topk", positions="all",
                               progress=False)
            use_lookahead(model, source)
            try:
                r = countdown.perplexity(model, ppl_ids, context=args.seq_len, prefix=prefix, progress=False)
            finally:
                remove_lookahead(model)
                countdown.unsparsify(model)
            look[f"{source}@{s}"]["ppl_topk_all"] = r.ppl
            print(f"{name} lookahead {source:9s} s={s}: ppl {r.ppl:.3f} (dense {dense_ppl:.3f})", flush=True)
    return look, preds


def hot_part(name, model, calib, held, args, preds):
    hot = {}
    for method, s in HOT_CONFIGS:
        kwargs = {}
        if method == "d-countdown":
            kwargs["predictors"] = preds.get(("ffn", s)) or train_lookahead(model, s, calib, source="ffn",
                                                                            epochs=args.epochs)
        countdown.sparsify(model, method, s, calibration=calib, progress=False, **kwargs)
        try:
            freqs = keep_frequencies(model, calib)
            row = {}
            for fraction in FRACTIONS:
                for rule in ("global", "per-layer"):
                    r = hit_rates(model, resident_sets(freqs, fraction, rule), held)
                    row[f"{rule}@{fraction}"] = {"hit_rate": r["hit_rate"], "kept_fraction": r["kept_fraction"],
                                                 "per_layer": r["per_layer"]}
                    print(f"{name} hot {method} {s}: resident {fraction:.0%} ({rule}) hit rate {r['hit_rate']:.3f} "
                          f"(kept {r['kept_fraction']:.3f})", flush=True)
            hot[f"{method}@{s}"] = row
        finally:
            countdown.unsparsify(model)
    return hot


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen2.5-coder-0.5b,gemma3-270m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=6144)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lookahead-sparsities", default="0.9")
    ap.add_argument("--parts", default="lookahead,hot")
    ap.add_argument("--out", default="offload_study.json")
    args = ap.parse_args()
    args.lookahead_sparsities = [float(s) for s in args.lookahead_sparsities.split(",")]
    results = []
    for name in args.models.split(","):
        if not assets.installed(name):
            print(f"{name}: not installed, skipped")
            continue
        torch.manual_seed(0)
        results.append(study(name, args))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps([{k: v for k, v in r.items() if k in ("model", "dense_ppl", "seconds")} for r in results]))


if __name__ == "__main__":
    main()
