"""Issue 11's speed figures in one process: `countdown bench` with the settings docs/BENCHMARKS.md records.

    PYTHONPATH=. python3 bench/decode_speed.py                    # the GPU run (~9 min on an H100)
    PYTHONPATH=. python3 bench/decode_speed.py --batch 1,2 --no-routes   # later options replace earlier ones
    PYTHONPATH=. python3 bench/decode_speed.py --print            # only print the command it runs

It runs `countdown bench` (countdown/speed.py `measure_bench`) on the Llama-3-8B shape with random bf16
weights: dense, M-COUNTDOWN and D-COUNTDOWN (untrained predictors of the paper's size) at 70% and 90%,
at batch 1, 2, 4, 8 and 16, dense first at every batch and every speed-up against it; the first batch
compiled (one torch.compile per configuration, ~45-60 s each), the others through the CUDA graph
alone; per configuration at batch 1 also `countdown.generate`'s whole-call tokens/s, plain
`model.generate` (32 tokens), GPU memory after sparsify and the forward time of a 2048-token prompt
(positions "decode" and "all"). 128 new tokens per run, median of 3. A step that would end past 530 s
is not started (the device's limit is 600 s per call); speed.json and speed.md under $OUT/decode-speed
hold every finished point as it lands, and the tables print last.
"""

from __future__ import annotations

import os
import shlex
import sys

ISSUE_11 = ["bench", "-m", "random:llama-3-8b", "--methods", "m-countdown,d-countdown", "--sparsities", "0.7,0.9",
            "--batch", "1,2,4,8,16", "--compile", "--compile-batches", "first", "--routes", "--route-tokens", "32",
            "--new-tokens", "128", "--repeats", "3", "--calib-windows", "4", "--prefill-len", "2048",
            "--max-seconds", "530"]


def main(argv: list[str]) -> None:
    show = "--print" in argv
    argv = [a for a in argv if a != "--print"]
    out = os.path.join(os.environ.get("OUT", "runs"), "decode-speed")
    args = ISSUE_11 + ["--out", out] + argv  # click keeps the last value of an option given twice
    print("countdown " + shlex.join(args), flush=True)
    if not show:
        from countdown.cli import app

        app(args)


if __name__ == "__main__":
    main(sys.argv[1:])
