"""Real-model statistics behind `countdown.offload` (CPU, issue 27): lookahead predictors and hot neurons.

For each built-in model named (smallest first; a model that is not installed is skipped and said so):

1. Lookahead (D-COUNTDOWN practical, our recipe, rank ≈5% of the FFN, one predictor set per source and
   target, all trained by `predictor.train_layer` on the same calibration tokens and the same labels,
   the layer's true top-(1 − s) of |t| in the dense model). Sources: "ffn" (the in-place predictor:
   the FFN's own input), "attention" (the layer's attention input: known before the attention runs)
   and "previous" (layer l − 1's FFN input, DejaVu's; layer 0 reads its attention input).
   - recall: of the true top-(1 − s) by |t|, the fraction the predictor's own top-(1 − s) keeps, at every
     position of the evaluation windows (held-out text, disjoint from calibration), mean over layers;
   - perplexity under the decode protocol (``positions="decode"``: each 512-token window's first 256
     tokens run dense as context, its last 256 are scored with every FFN sparse; windows slide by 256),
     D-COUNTDOWN with the predictor's exact per-token top-k (``mode="topk"``: the target sparsity
     exactly, the kept set the recall measures), lookahead sources installed with `use_lookahead`.
2. Hot neurons: M-COUNTDOWN 70%, CATS 50% and D-COUNTDOWN 90% (the in-place predictor of part 1), each in
   threshold mode (`sparsify`'s default with calibration) calibrated on the calibration windows; keep
   frequencies (`hot.keep_frequencies`) on the calibration windows; resident sets of 25% / 50% of all FFN
   neurons by offload's global rule (`hot.resident_sets`); `hot.hit_rates` on the evaluation windows:
   the fraction of kept neurons, counted per token, that are resident.

Results go to ``--out/<model>.json`` after every point (a rerun skips the points already there), and
``--tables`` prints the Markdown tables of docs/STUDY.md section 9 from those files.

    nice -n 19 env PYTHONPATH=. python scripts/study/offload_study.py --out docs/study/offload \\
        --models smollm2,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b
    PYTHONPATH=. python scripts/study/offload_study.py --out docs/study/offload --tables
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import countdown
from countdown import assets
from countdown.data import (
    calibration_text,
    document_prefix,
    evaluation_text,
    first_tokens,
    token_stream,
)
from countdown.hot import hit_rates, keep_frequencies, resident_sets
from countdown.lookahead import (
    collect_sources,
    remove_lookahead,
    train_lookahead,
    use_lookahead,
)
from countdown.predictor import _Counts, _labels, _recall_counts, logits_of

SOURCES = ("ffn", "attention", "previous")
HOT_CONFIGS = (("m-countdown", 0.7), ("cats", 0.5), ("d-countdown", 0.9))
FRACTIONS = (0.25, 0.5)


def recall_on(xs: list[torch.Tensor], ts: list[torch.Tensor], predictors, sparsity: float) -> list[float]:
    """Per layer, the fraction of the true top-(1 − s) by |t| that the predictor's top-(1 − s) keeps."""
    out = []
    for layer, x, t in zip(predictors, xs, ts):
        c = _Counts()
        c.add(_recall_counts(logits_of({k: v.float() for k, v in layer.items()}, x), _labels(t, sparsity), sparsity))
        out.append(c.metrics()["recall"])
    return out


class Results:
    """One model's JSON file, written after every point."""

    def __init__(self, path: Path, model: str):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"model": model}

    def has(self, part: str, key: str) -> bool:
        return key in self.data.get(part, {})

    def put(self, part: str, key: str, value) -> None:
        self.data.setdefault(part, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=1))


def study(name: str, args, res: Results) -> None:
    t_model = time.time()
    model, tok = countdown.load(name, device="cpu", dtype=args.dtype)
    calib = first_tokens(tok, calibration_text(), args.calib_tokens, args.seq_len)
    held = first_tokens(tok, evaluation_text(), args.eval_tokens, args.seq_len)
    ppl_ids = token_stream(tok, evaluation_text(), args.ppl_tokens, 512)
    prefix = document_prefix(tok)
    res.data.update({"dtype": args.dtype, "calib_windows": list(calib.shape), "eval_windows": list(held.shape),
                     "ppl_tokens": int(ppl_ids.numel()), "epochs": args.epochs or "recipe"})
    print(f"{name}: loaded in {time.time() - t_model:.0f}s", flush=True)
    if "lookahead" in args.parts and not res.has("lookahead", "dense_ppl_decode"):
        r = countdown.perplexity(model, ppl_ids, context=512, positions="decode", prefix=prefix, progress=False)
        res.put("lookahead", "dense_ppl_decode", r.ppl)
    preds: dict[tuple[str, float], object] = {}
    todo = [(src, s) for s in args.sparsities for src in SOURCES if not res.has("lookahead", f"{src}@{s}")]
    need_ffn_preds = "hot" in args.parts and any(m == "d-countdown" and not res.has("hot", f"{m}@{s}")
                                                 for m, s in HOT_CONFIGS)
    if "lookahead" in args.parts and todo or need_ffn_preds:
        t0 = time.time()
        train_x, train_t = collect_sources(model, calib, SOURCES)
        eval_x, eval_t = collect_sources(model, held, SOURCES) if todo else (None, None)
        print(f"{name}: pairs collected in {time.time() - t0:.0f}s", flush=True)
        if "lookahead" in args.parts:
            for source, s in todo:
                t0 = time.time()
                p = train_lookahead(model, s, pairs=(train_x[source], train_t), source=source, epochs=args.epochs)
                preds[(source, s)] = p
                rec = recall_on(eval_x[source], eval_t, p, s)
                row = {"recall_eval_mean": sum(rec) / len(rec), "recall_eval_min": min(rec),
                       "recall_eval_per_layer": rec, "recall_calib_holdout_mean": p.summary()["recall_mean"],
                       "rank": p.summary()["rank"], "train_s": time.time() - t0}
                row["ppl_decode_topk"] = _perplexity(model, p, source, s, ppl_ids, prefix)
                row["seconds"] = time.time() - t0
                res.put("lookahead", f"{source}@{s}", row)
                print(f"{name} {source:9s} s={s}: recall {row['recall_eval_mean']:.3f} (min {min(rec):.3f}), "
                      f"ppl {row['ppl_decode_topk']:.3f} (dense {res.data['lookahead']['dense_ppl_decode']:.3f}), "
                      f"{row['seconds']:.0f}s", flush=True)
        if need_ffn_preds and ("ffn", 0.9) not in preds:
            preds[("ffn", 0.9)] = train_lookahead(model, 0.9, pairs=(train_x["ffn"], train_t), source="ffn",
                                                  epochs=args.epochs)
        del train_x, train_t, eval_x, eval_t
    if "hot" in args.parts:
        hot_part(name, model, calib, held, preds, res)


def _perplexity(model, predictors, source: str, sparsity: float, ppl_ids, prefix) -> float:
    countdown.sparsify(model, "d-countdown", sparsity, predictors=predictors, mode="topk", positions="decode",
                       progress=False)
    try:
        if source != "ffn":
            use_lookahead(model, source)
        try:
            return countdown.perplexity(model, ppl_ids, context=512, prefix=prefix, progress=False).ppl
        finally:
            if source != "ffn":
                remove_lookahead(model)
    finally:
        countdown.unsparsify(model)


def hot_part(name: str, model, calib, held, preds, res: Results) -> None:
    for method, s in HOT_CONFIGS:
        key = f"{method}@{s}"
        if res.has("hot", key):
            continue
        t0 = time.time()
        kwargs = {"predictors": preds[("ffn", s)]} if method == "d-countdown" else {}
        countdown.sparsify(model, method, s, calibration=calib, progress=False, **kwargs)
        try:
            freqs = keep_frequencies(model, calib)
            row = {}
            for fraction in FRACTIONS:
                r = hit_rates(model, resident_sets(freqs, fraction, "global"), held)
                row[f"global@{fraction}"] = {"hit_rate": r["hit_rate"], "kept_fraction": r["kept_fraction"],
                                             "per_layer": r["per_layer"], "tokens": r["tokens"]}
                print(f"{name} hot {method} {s}: resident {fraction:.0%} hit rate {r['hit_rate']:.3f} "
                      f"(kept {r['kept_fraction']:.3f})", flush=True)
            row["seconds"] = time.time() - t0
            res.put("hot", key, row)
        finally:
            countdown.unsparsify(model)


def _change(ppl: float, dense: float) -> str:
    ratio = ppl / dense
    return f"{100 * (ratio - 1):+.0f}%" if ratio < 10 else f"×{ratio:.0f}"


def tables(out: Path) -> str:
    files = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    order = {n: i for i, n in enumerate(("smollm2", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"))}
    files.sort(key=lambda d: order.get(d["model"], 99))
    lines = ["| model | target | source | recall (eval) | worst layer | recall vs in-place | ppl decode | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for d in files:
        look = d.get("lookahead", {})
        dense = look.get("dense_ppl_decode")
        keys = sorted((k for k in look if "@" in k),
                      key=lambda k: (-float(k.split("@")[1]), SOURCES.index(k.split("@")[0])))
        for key in keys:
            source, s = key.split("@")
            r = look[key]
            base = look.get(f"ffn@{s}")
            versus = f"{r['recall_eval_mean'] - base['recall_eval_mean']:+.3f}" if base and source != "ffn" else "—"
            lines.append(f"| {d['model']} | {float(s):.0%} | {source} | {r['recall_eval_mean']:.3f} | "
                         f"{r['recall_eval_min']:.3f} | {versus} | {r['ppl_decode_topk']:.4g} | "
                         f"{_change(r['ppl_decode_topk'], dense)} |")
        if keys:
            lines.append(f"| {d['model']} | dense | — | — | — | — | {dense:.4g} | — |")
    lines += ["", "| model | configuration | kept per token | hit rate, 25% resident | hit rate, 50% resident |",
              "|---|---|---|---|---|"]
    for d in files:
        for key, row in d.get("hot", {}).items():
            method, s = key.split("@")
            lines.append(f"| {d['model']} | {method} {float(s):.0%} | {row['global@0.25']['kept_fraction']:.3f} | "
                         f"{row['global@0.25']['hit_rate']:.3f} | {row['global@0.5']['hit_rate']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seq-len", type=int, default=256, help="calibration / evaluation window length")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=None, help="predictor epochs (default: the recipe's, 15)")
    ap.add_argument("--sparsities", default="0.9,0.7")
    ap.add_argument("--parts", default="lookahead,hot")
    ap.add_argument("--out", type=Path, default=Path("docs/study/offload"))
    ap.add_argument("--tables", action="store_true", help="print the Markdown tables from --out and stop")
    args = ap.parse_args()
    if args.tables:
        print(tables(args.out))
        return
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        if not assets.installed(name):
            print(f"{name}: not installed, skipped (countdown install-model {name})", flush=True)
            continue
        torch.manual_seed(0)
        study(name, args, Results(args.out / f"{name}.json", name))
    print(tables(args.out))


if __name__ == "__main__":
    main()
