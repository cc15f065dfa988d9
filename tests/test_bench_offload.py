"""bench/offload.py end to end on the CPU with a tiny shape, so the one GPU run is not lost to a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_offload_bench_runs_on_cpu_tiny(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "offload.py"), "--device", "cpu", "--shape", "tiny",
                           "--new-tokens", "2", "--prompt-len", "8", "--skip", "nocache",
                           "--hit-rates", "m-countdown=0.5,cats=0.5,d-countdown=0.5", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "offload.json").read_text())
    configs = [r["config"] for r in result["rows"]]
    assert configs == ["dense-stream (b)", "d-countdown 90%", "m-countdown 70%", "cats 50%",
                       "d-countdown 90% look-attention", "d-countdown 90% look-attention +overlap",
                       "d-countdown 90% look-previous +overlap"]
    for r in result["rows"]:
        assert r["tok_s"] > 0 and r["link_bytes_per_token"] >= 0 and 0 < r["pct_of_floor"]
    assert result["rows"][0]["link_bytes_per_token"] > 0  # dense streaming moves every host row
    assert all("projected" in r for r in result["rows"][1:])
    overlapped = [r for r in result["rows"] if r["config"].endswith("+overlap")]
    assert all(r["overlap"].startswith("CPU device") and r["rows_prefetched_per_token"] > 0 for r in overlapped)
    assert result["rows"][4]["overlap"] is None and result["rows"][4]["rows_prefetched_per_token"] == 0
    # accelerate needs CUDA: reported as not measured, the run goes on
    assert [e["config"] for e in result["errors"]] == ["accelerate offload (a)"]
    assert "not measured: accelerate offload (a)" in proc.stdout.strip().splitlines()[-1]
