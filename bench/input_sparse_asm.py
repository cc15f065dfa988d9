"""Compile the input-sparse kernels for sm_90 without a GPU and report what the compiler made of them.

    PYTHONPATH=. python3 bench/input_sparse_asm.py        # CPU only, ~30 s; needs triton's bundled ptxas

For the walk kernel (``input_sparse._input_sparse_kernel``, shipped configuration) and the prefetch
kernel (``input_sparse_prefetch._prefetch_kernel``) at the Llama-3-8B o_proj grid: async copies in
the TTGIR (did the pipeliner overlap the weight loads of later steps?), 16-byte cp.async / ld.v4 in
the PTX, registers and stack (spills) from the cubin, shared memory. Run it after any change to a
kernel's loop: it answers "is the loop pipelined" before device time is spent. (Triton here may be
newer than on the device; the device's own compile is the final word.)
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from countdown.kernels import input_sparse as isp  # noqa: E402
from countdown.kernels import input_sparse_prefetch as ispf  # noqa: E402

ALIGNED = ("x_ptr", "w_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "out_ptr", "o0_ptr", "o1_ptr", "o2_ptr", "ws_ptr",
           "cnt_ptr", "K", "N", "N0", "N1", "N2", "KPP")  # what Triton specialises as 16-divisible on the device


def compile_sm90(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int):
    sig = {a: types.get(a, "constexpr" if a in constexprs else "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED if a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                              num_stages=num_stages))


def report(name: str, kernel) -> None:
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.findall(r"REG:(\d+)", res)
    stack = re.findall(r"STACK:(\d+)", res)
    cp16 = len(re.findall(r"cp\.async\.cg\.shared\.global[^;]*, 0x10", ptx))
    ldv4 = len(re.findall(r"ld\.global[.\w:]*\.v4", ptx))
    print(f"{name:34} async copies {ttgir.count('async_copy_global_to_local'):3}  16-B cp.async {cp16:3}  "
          f"ld.v4 {ldv4:3}  regs {','.join(regs)}  stack {','.join(stack)}  smem {kernel.metadata.shared}")


def main() -> None:
    t = "*bf16"
    cfg = isp._GPU_CONFIG
    walk_types = dict(x_ptr=t, w_ptr=t, scale_ptr=t, thr_ptr="*fp32", ws_ptr="*fp32", cnt_ptr="*i32", out_ptr=t,
                      thr_value="fp32")
    walk = dict(WINA=False, THR_PTR=True, B_PAD=16, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, CHUNK=cfg.chunk,
                DOT=True, COMPACT=False, SPLIT=True, NUM_STAGES=cfg.num_stages, F32=False)
    report("walk (shipped)", compile_sm90(isp._input_sparse_kernel, walk_types, walk, cfg.num_warps, cfg.num_stages))

    pf_types = {**{a: t for a in ("x_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "s0_ptr", "s1_ptr", "s2_ptr",
                                  "o0_ptr", "o1_ptr", "o2_ptr")},
                **{a: "*fp32" for a in ("t0_ptr", "t1_ptr", "t2_ptr", "ws_ptr")},
                "cnt_ptr": "*i32", "tv0": "fp32", "tv1": "fp32", "tv2": "fp32"}
    for name, c, nseg, bp in [("prefetch auto, B=1", ispf._GPU_CONFIG, 1, 1),
                              ("prefetch auto, B=16", ispf._GPU_CONFIG, 1, 16),
                              ("prefetch auto, q/k/v in one", ispf._GPU_CONFIG, 3, 1),
                              ("prefetch manual, B=1", ispf.PrefetchConfig(pipe="manual", num_stages=1), 1, 1)]:
        nstep = 256 // c.block_k  # o_proj on an H100: 16 splits of 256 channels
        const = dict(NSEG=nseg, WINA=False, THR_PTR=True, BP=bp, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                     NCH=1, XS=nstep, SPLIT=True,
                     PIPE=0 if c.pipe == "auto" else 1, NUM_STAGES=c.num_stages, F32=False)
        report(name, compile_sm90(ispf._prefetch_kernel, pf_types, const, c.num_warps, c.num_stages))


if __name__ == "__main__":
    main()
