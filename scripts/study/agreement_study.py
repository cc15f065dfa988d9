"""Generation quality and Sirius correction on the real models (issue 28 items 2-3): greedy agreement with
dense over held-out prompts, the dense model's perplexity of the sparse continuation, tokens per dense
forward; and (--speed) decode speed against dense through the CPU route. One JSON line per row, appended
to --out (a re-run skips rows the file has); --tables prints docs/STUDY.md §11's tables from the files.

    # quality (no timing): every configuration × {none, strict, relaxed} × k
    PYTHONPATH=. python scripts/study/agreement_study.py --model smollm2 --out bench/results/agreement-smollm2.jsonl
    # speed, on a quiet machine (the numbers in STUDY.md were taken niced under load: re-run this)
    PYTHONPATH=. python scripts/study/agreement_study.py --model smollm2 --speed --out bench/results/agreement-speed-smollm2.jsonl
    PYTHONPATH=. python scripts/study/agreement_study.py --tables bench/results/agreement-smollm2.jsonl \
        --speed-file bench/results/agreement-speed-smollm2.jsonl

Protocol: prompts are --prompts consecutive windows of --prompt-len tokens from the start of the default
corpus's evaluation part (held out from the calibration part), after the tokenizer's document prefix
(Gemma's <bos>; none for SmolLM2 and Qwen); each gets --new-tokens greedy tokens (no
EOS stop) through `countdown.generate`'s decode loop (`countdown.agreement.generation_agreement`): prefill
dense, decode sparse (positions="decode"). Thresholds: threshold mode, "pooled" rule, calibrated on the
first --calib-windows × 512 calibration tokens (what `countdown run` does); "mw" = model-wide (the
attention projections' inputs at the same sparsity, TEAL model-wide). Correction: Sirius
(`countdown.correction`), a dense check every k sparse tokens, strict (greedy-equal) or relaxed
(dense probability at T=0.6 >= 0.1, Sirius's defaults). Speed: decode tokens/s of --speed-tokens tokens on
the first prompt (prefill excluded), median of --repeats runs after a warm-up, through `countdown.Decoder`
on the CPU (its default CPU route: the C++ GEMV for dense linears, the C++ sparse kernels for sparse
modules); dense = the same model unsparsified, timed before and after each configuration (median of both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import countdown
from countdown.agreement import generation_agreement
from countdown.data import calibration_text, document_prefix, evaluation_text, first_tokens
from countdown.decode import Decoder
from countdown.loading import load

CONFIGS = "teal:0.25:mw,teal:0.5:mw,m-countdown:0.5,m-countdown:0.7,cats:0.5"


def _parse(config: str) -> tuple[str, float, bool]:
    method, sparsity, *rest = config.split(":")
    return method, float(sparsity), rest == ["mw"]


def _label(config: str) -> str:
    method, s, wide = _parse(config)
    return f"{method} {s:.0%}" + (" model-wide" if wide else "")


def _variants(ks: list[int], rules: list[str]) -> list[tuple[int | None, str]]:
    return [(None, "strict")] + [(k, r) for k in ks for r in rules]


def _variant_label(k: int | None, rule: str) -> str:
    return "none" if k is None else f"{rule} k={k}"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "dense_tokens")}), flush=True)


def _sparsify(model, config: str, calib: torch.Tensor) -> None:
    method, s, wide = _parse(config)
    countdown.sparsify(model, method, s, calibration=calib, mode="threshold", positions="decode",
                       attention=s if wide else None, max_windows=None, progress=False)


def quality(args, model, prompts, calib) -> None:
    out = Path(args.out)
    rows = _rows(out)
    done = {(r["config"], r["correction"]) for r in rows if r["model"] == args.model}
    dense_tokens = next((torch.tensor(r["dense_tokens"]) for r in rows if r["model"] == args.model), None)
    variants = _variants(args.ks, args.rules)
    for config in args.configs.split(","):
        todo = [(k, rule) for k, rule in variants if (config, _variant_label(k, rule)) not in done]
        if not todo:
            continue
        _sparsify(model, config, calib)
        try:
            for k, rule in todo:
                t0 = time.time()
                r = generation_agreement(model, prompts, max_new_tokens=args.new_tokens, correct_every=k,
                                         accept=rule, dense_tokens=dense_tokens)
                dense_tokens = r.dense_tokens
                _append(out, dict(model=args.model, config=config, correction=_variant_label(k, rule),
                                  prompts=int(prompts.shape[0]), prompt_len=int(prompts.shape[1]),
                                  new_tokens=args.new_tokens, first_divergence=r.first_divergence,
                                  mean_first_divergence=r.mean_first_divergence,
                                  fraction_equal=r.fraction_equal, mean_fraction_equal=r.mean_fraction_equal,
                                  drift_ppl=r.drift_ppl, dense_ppl=r.dense_ppl, dense_forwards=r.dense_forwards,
                                  accepted=r.accepted, drafted=r.drafted,
                                  tokens_per_dense_forward=r.tokens_per_dense_forward,
                                  acceptance_rate=r.acceptance_rate, seconds=time.time() - t0,
                                  dense_tokens=r.dense_tokens.tolist()))
        finally:
            countdown.unsparsify(model)


def _time(model, prompt: torch.Tensor, n: int, k: int | None, rule: str) -> float:
    decoder = Decoder(model, prompt.shape[1] + n + (k or 0))
    return decoder.generate(prompt, n, correct_every=k, accept=rule).tokens_per_second


def speed(args, model, prompts, calib) -> None:
    out = Path(args.out)
    prompt, n = prompts[:1], args.speed_tokens
    variants = _variants(args.ks, args.rules)
    print(f"{torch.get_num_threads()} threads; C++ kernels: {countdown.kernels.cpu.extension_reason() or 'ready'}",
          flush=True)
    for config in args.configs.split(","):
        _time(model, prompt, n, None, "strict")  # warm-up
        dense = [_time(model, prompt, n, None, "strict") for _ in range(args.repeats)]
        _sparsify(model, config, calib)
        try:
            runs: dict = {v: [] for v in variants}
            for v in variants:
                _time(model, prompt, n, *v)  # warm-up (and the kernels' first-call layout)
            for _ in range(args.repeats):
                for v in variants:
                    runs[v].append(_time(model, prompt, n, *v))
        finally:
            countdown.unsparsify(model)
        dense += [_time(model, prompt, n, None, "strict") for _ in range(args.repeats)]
        base = statistics.median(dense)
        for (k, rule), tps in runs.items():
            _append(out, dict(model=args.model, config=config, correction=_variant_label(k, rule), new_tokens=n,
                              prompt_len=int(prompt.shape[1]), tokens_per_second=statistics.median(tps),
                              runs=tps, dense_tokens_per_second=base, dense_runs=dense,
                              speedup=statistics.median(tps) / base, threads=torch.get_num_threads()))


def _f(x: float, fmt: str) -> str:
    return "—" if x is None or x != x else format(x, fmt)


def tables(quality_file: Path, speed_file: Path | None) -> str:
    rows = _rows(quality_file)
    fast = {(r["model"], r["config"], r["correction"]): r for r in (_rows(speed_file) if speed_file else [])}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        r0 = mine[0]
        lines += [f"#### {model}: {r0['prompts']} prompts × {r0['prompt_len']} tokens, {r0['new_tokens']} greedy tokens each; "
                  f"dense ppl of its own continuation {r0['dense_ppl']:.3f}", "",
                  "| configuration | correction | first divergence (mean; per prompt) | fraction equal | drift ppl "
                  "| tokens / dense forward | acceptance | agreement recovered | speed × dense | speed-up kept |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        plain = {r["config"]: r for r in mine if r["correction"] == "none"}
        for r in mine:
            base = plain.get(r["config"])
            lost = 1 - base["mean_fraction_equal"] if base else float("nan")
            recovered = (r["mean_fraction_equal"] - base["mean_fraction_equal"]) / lost if base and lost > 0 else float("nan")
            s = fast.get((model, r["config"], r["correction"]))
            s0 = fast.get((model, r["config"], "none"))
            kept = ((s["speedup"] - 1) / (s0["speedup"] - 1)) if s and s0 and s0["speedup"] > 1 else float("nan")
            lines.append(
                f"| {_label(r['config'])} | {r['correction']} | {r['mean_first_divergence']:.1f}; "
                f"{', '.join(str(x) for x in r['first_divergence'])} | {r['mean_fraction_equal']:.3f} | "
                f"{r['drift_ppl']:.3f} | {_f(r['tokens_per_dense_forward'], '.2f')} | {_f(r['acceptance_rate'], '.3f')} | "
                f"{'—' if r['correction'] == 'none' else _f(recovered, '.0%')} | "
                f"{_f(s['speedup'], '.2f') if s else '—'} | {'—' if r['correction'] == 'none' else _f(kept, '.0%')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", default=CONFIGS, help="method:sparsity[:mw] (mw: model-wide, attention inputs too)")
    ap.add_argument("--ks", default="4,8")
    ap.add_argument("--rules", default="strict,relaxed")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--speed", action="store_true", help="Time decode speed against dense instead of quality.")
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/agreement.jsonl")
    ap.add_argument("--tables", default=None, help="Print the Markdown tables of this quality file and exit.")
    ap.add_argument("--speed-file", default=None, help="With --tables: the --speed rows to put beside them.")
    args = ap.parse_args()
    if args.tables:
        print(tables(Path(args.tables), Path(args.speed_file) if args.speed_file else None))
        return
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.rules = [r for r in args.rules.split(",") if r]
    t0 = time.time()
    model, tok = load(args.model, device="cpu", dtype="float32")
    print(f"loaded {args.model} in {time.time() - t0:.0f}s", flush=True)
    calib = first_tokens(tok, calibration_text(), args.calib_windows * 512, 512)
    prompts = first_tokens(tok, evaluation_text(), args.prompts * args.prompt_len, args.prompt_len)[: args.prompts]
    prefix = torch.tensor(document_prefix(tok), dtype=torch.long)  # Gemma's <bos>: a prompt starts a document
    prompts = torch.cat([prefix.expand(prompts.shape[0], -1), prompts], dim=1)
    (speed if args.speed else quality)(args, model, prompts, calib)


if __name__ == "__main__":
    main()
