"""llama.cpp's decode speed on a built-in model's own GGUF file: the row an edge user compares against.

    PYTHONPATH=. python scripts/bench_llamacpp.py --model qwen2.5-coder-1.5b --new-tokens 32 --threads 2

Same prompt as scripts/bench_cpu_route.py, greedy, batch 1; decode tokens/s is (new tokens − 1) over the
time from the first generated token to the last (the prompt's evaluation excluded), median of --repeats
after one warm-up. Needs ``pip install llama-cpp-python`` (built from source; not a countdown dependency).
"""

from __future__ import annotations

import argparse
import statistics
import time

from countdown import assets

PROMPT = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


def decode_tokens_per_second(llm, new_tokens: int) -> float:
    """One greedy generation; tokens/s of the decode phase only."""
    llm.reset()
    stamps = []
    for _ in llm.create_completion(PROMPT, max_tokens=new_tokens, temperature=0.0, top_k=1, stream=True):
        stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError(f"llama.cpp stopped after {len(stamps)} token(s); raise --new-tokens or change the prompt")
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama.cpp row skipped: llama_cpp is not installed (pip install llama-cpp-python)") from None

    gguf = assets.path(args.model)
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=args.threads, n_batch=64, verbose=False)
    decode_tokens_per_second(llm, args.new_tokens)  # warm-up
    runs = [decode_tokens_per_second(llm, args.new_tokens) for _ in range(args.repeats)]
    size = gguf.stat().st_size
    med = statistics.median(runs)
    print(f"llama.cpp {args.model} ({gguf.name}, {size / 1e9:.2f} GB file), {args.threads} threads: "
          f"{med:.1f} tok/s decode (runs {', '.join(f'{r:.1f}' for r in runs)}), "
          f"≈ {med * size / 1e9:.1f} GB/s of the file's bytes")


if __name__ == "__main__":
    main()
