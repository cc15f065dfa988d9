"""Helpers every bench script shares: logging, errors, GPU memory and state, timing, JSON output.

Scripts run as ``PYTHONPATH=. python bench/<script>.py``; Python puts ``bench/`` first on ``sys.path``,
so they import this module as ``_common``. Nothing here changes a module global of ``countdown``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable

import torch

T0 = time.time()


def log(*args) -> None:
    """Print with the seconds since the script started, flushed (device logs arrive as they happen)."""
    print(f"[{time.time() - T0:6.0f}s]", *args, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when ``out`` holds a NaN or an infinity."""
    if not torch.isfinite(out).all():
        return float("inf")
    out, ref = out.double().flatten(), ref.double().flatten()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gib() -> float:
    """GiB allocated on the current CUDA device now (NaN without CUDA)."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def peak_gib() -> float:
    """Peak GiB allocated on the current CUDA device since the start (NaN without CUDA)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_state() -> dict[str, float]:
    """SM and memory clock (MHz), power (W) and temperature (C) now, from nvidia-smi; {} where it is missing."""
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
        sm, mem, power, temp = (float(v) for v in line.strip().splitlines()[0].split(","))
        return {"sm_mhz": sm, "mem_mhz": mem, "power_w": power, "temp_c": temp}
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return {}


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (read + write) of a 1 GiB buffer: the byte floor's rate."""
    import triton

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * n / (ms * 1e-3) / 1e9


def bench_graph(fn: Callable[[int], object], copies: int) -> float:
    """Median µs of one ``fn(c)``: ``fn(0) … fn(copies-1)`` (each on its own weights, beyond L2) captured
    in one CUDA graph, timed by ``triton.testing.do_bench`` (L2 flushed before each replay), divided by
    ``copies``. Without CUDA (a CPU smoke run, kernels in Triton's interpreter) one eager pass is timed
    on the host: the code path only, not a speed."""
    for c in range(copies):
        fn(c)
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for c in range(copies):
            fn(c)
        return (time.perf_counter() - t) * 1e6 / copies
    import triton

    torch.cuda.synchronize()
    side = torch.cuda.Stream()  # warm-up on a side stream, as graph capture wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in range(copies):
            fn(c)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [fn(c) for c in range(copies)]  # noqa: F841 (kept alive with the graph)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms * 1e3 / copies


def environment() -> dict[str, str]:
    """What a figure needs beside it: device, torch / triton / transformers versions, date."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"device": device_name(), "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def save_json(name: str, payload: dict) -> None:
    """Write ``payload`` to ``$OUT/name`` when $OUT is set (the device machine's result folder)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            json.dump(payload, f, indent=1, default=str)
