"""Speed-up against quality loss for every FFN + attention-input combination (issue 13's plot).

    PYTHONPATH=. python scripts/study/attention_tradeoff.py bench/results/attention-quality-*-cpu-*.json \
        --speed bench/results/instance-spread-tradeoff-run1-h100-2026-12-07.json \
        --speed bench/results/instance-spread-tradeoff-run2-h100-2026-12-07.json --plot docs/attention_tradeoff.png
    (--speed takes bench/ab.py's JSON, and the older instance_spread JSON in bench/results, each configuration
    against the best dense of its own run; give --speed once per file)

Quality: `scripts/study/attention_quality.py` on real models (Δppl against dense, every position sparse).
Speed: the byte ceiling of each combination on the Llama-3-8B shape (bf16, batch 1, 128 prompt + 128
mean decoded positions of KV cache), with the real model's measured sparsities put on that shape:
dense bytes per token ÷ this combination's. Where a speed run measured the same
(method, FFN target, attention target) on the H100, the measured speed-up is drawn too (filled marker)
and printed beside the ceiling. A table is printed last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from countdown.loading import RANDOM_SHAPES
from countdown.methods import get_method
from countdown.speed import model_bytes

CONTEXT = 128 + 128  # positions of KV cache read per step, as in the speed runs (prompt 128, 256 new)


def llama3_bytes():
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_SHAPES["llama-3-8b"]), dtype=torch.bfloat16)
    return model_bytes(model)


def ffn_fraction(row: dict) -> float:
    if "ffn_bytes_read" in row:
        return row["ffn_bytes_read"]
    # rows written before the bytes were recorded: the method's own formula, TEAL's input site at its target
    skipped = {"coef": row["measured_ffn"], "input": row["ffn"]}
    return get_method(row["method"]).ffn_bytes_read("gated", skipped)


def speedups(data: dict) -> dict[tuple, float]:
    """(method, FFN target, attention target) -> measured speed-up: the median tok/s of each configuration's
    calls over the best dense median of the same run. Takes bench/ab.py's JSON (the ``default`` option set
    only) and the older bench/instance_spread.py's (configs with extras other than the defaults' left out)."""
    from statistics import median

    by_config: dict[str, list[float]] = {}
    for call in data["calls"]:
        if call.get("options_name", "default") == "default":
            by_config.setdefault(call["config"], []).append(call["tokens_per_s"])
    dense = max((median(v) for c, v in by_config.items() if c.split("+")[0] == "dense"), default=None)
    out = {}
    for config, tps in by_config.items():
        spec, *extras = config.split("+")
        if spec == "dense" or dense is None or any(e not in ("gqa", "attnk") for e in extras):
            continue
        method, *rest = spec.split(":")
        key = (method, round(float(rest[0]), 2), round(float(rest[1]) if len(rest) > 1 else 0.0, 2))
        out[key] = median(tps) / dense
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quality", nargs="+", type=Path)
    ap.add_argument("--speed", type=Path, action="append", default=[])
    ap.add_argument("--plot", type=Path, default=Path("docs/attention_tradeoff.png"))
    args = ap.parse_args()
    nb = llama3_bytes()
    dense = nb.per_token(CONTEXT)
    measured = {}
    for path in args.speed:
        for key, ratio in speedups(json.loads(path.read_text())).items():
            measured[key] = ratio  # a later file replaces an earlier one's figure

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    lines = ["| model | method | FFN | attention | Δppl | ceiling on Llama-3-8B (bytes) | measured H100 |",
             "|---|---|---|---|---|---|---|"]
    for i, path in enumerate(args.quality):
        data = json.loads(path.read_text())
        for r in data["rows"]:
            skipped = {k: v for k, v in (r["measured_attention"] or {}).items()}
            ceiling = dense / nb.per_token(CONTEXT, ffn_fraction(r), 0, skipped)
            rel = r["ppl"] / data["dense_ppl"] - 1
            key = (r["method"], round(r["ffn"], 2), round(r["attention"], 2))
            marker = "o" if r["method"] == "m-countdown" else "s"
            ax.scatter([100 * rel], [ceiling], marker=marker, facecolors="none", edgecolors=f"C{i}")
            ax.annotate(f"{'M' if r['method'] == 'm-countdown' else 'T'}{r['ffn']:.0%}/{r['attention']:.0%}",
                        (100 * rel, ceiling), fontsize=6, xytext=(3, 2), textcoords="offset points")
            got = measured.get(key)
            if got is not None:
                ax.scatter([100 * rel], [got], marker=marker, color=f"C{i}")
                ax.plot([100 * rel, 100 * rel], [got, ceiling], color=f"C{i}", linewidth=0.6, alpha=0.6)
            lines.append(f"| {data['model']} | {r['method']} | {r['ffn']:.0%} | {r['attention']:.0%} | "
                         f"{r['delta']:+.3f} ({rel:+.1%}) | {ceiling:.2f}× | {'—' if got is None else f'{got:.2f}×'} |")
        ax.scatter([], [], marker="o", facecolors="none", edgecolors=f"C{i}", label=data["model"])
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("perplexity increase over dense, % (real model, every position sparse)")
    ax.set_ylabel("decode speed-up on the Llama-3-8B shape")
    ax.set_title("M = M-COUNTDOWN FFN% / attention-input%, T = TEAL model-wide;\n"
                 "hollow: byte ceiling, filled: measured on H100 (bf16, batch 1)", fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=130)
    plt.close(fig)
    print(f"wrote {args.plot}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
