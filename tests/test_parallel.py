"""Tensor parallelism: a TP=2 sparsified model gives the single-process sparsified model's logits.

Two CPU processes (gloo) each build the same tiny Llama, shard it (transformers' own
``from_pretrained(tp_plan="auto")`` and `countdown.parallel.shard_model`), load sparsity artifacts
calibrated on the unsharded model in this process, and write their logits; this process compares.
With ``COUNTDOWN_TP_DEVICE=cuda`` the same test runs on two GPUs with NCCL (the kernel case then runs
the compiled Triton kernel): ``COUNTDOWN_TP_DEVICE=cuda python -m pytest tests/test_parallel.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import countdown
from countdown.predictor import Predictors
from tiny_models import HIDDEN, INTER, tiny_model, tokens

DEVICE = os.environ.get("COUNTDOWN_TP_DEVICE", "cpu")
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available())
    or (DEVICE == "cuda" and torch.cuda.device_count() < 2),
    reason="needs torch.distributed with gloo (or, with COUNTDOWN_TP_DEVICE=cuda, two GPUs)")

WORLD = 2
# transformers' from_pretrained(tp_plan="auto"); countdown.parallel.shard_model. COUNTDOWN_TP_ENGINES narrows
# it (transformers 5.17's own plan refuses the tiny model's odd vocabulary of 97 for its gathered lm_head)
ENGINES = tuple(os.environ.get("COUNTDOWN_TP_ENGINES", "hf,torch").split(","))
SPARSITY = 0.5
# (name, method, kernels): "always" runs M-COUNTDOWN's decode step through its Triton kernel (the
# interpreter on the CPU), whose partial output countdown all-reduces itself
CASES = [("m", "m-countdown", "off"), ("m_kernel", "m-countdown", "always"), ("d", "d-countdown", "off"),
         ("chess", "chess", "off")]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(1, 12, seed=5)
    return ids, ids[:, :-1]  # the whole forward; the prompt of the decode step (its last token is the step)


@torch.no_grad()
def _logits(model) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    ids, prompt = (t.to(device) for t in _inputs())
    full = model(input_ids=ids).logits
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    step = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
    return {"full": full.cpu(), "step": step.cpu()}


def _worker(rank: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if DEVICE == "cuda":
        os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
        torch.cuda.set_device(rank)
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:  # one pair of processes for both engines: their start-up is most of the test's time
        for engine in ENGINES:
            _run(rank, Path(tmp), engine)
    finally:
        dist.destroy_process_group()


def _run(rank: int, tmp: Path, engine: str) -> None:
    from countdown import parallel

    if engine == "hf":
        import transformers as tf

        model = tf.AutoModelForCausalLM.from_pretrained(tmp / "model", tp_plan="auto", dtype=torch.float32).eval()
    else:
        model = parallel.shard_model(tiny_model("llama").to(DEVICE))
    gate = model.model.layers[0].mlp.gate_proj.weight
    assert parallel.is_sharded(gate) and parallel.local(gate).shape == (INTER // WORLD, HIDDEN)
    out = {"dense": _logits(model)}
    errors = {}
    for name, _, kernels in CASES:
        countdown.load_sparsity(model, tmp / f"{name}.safetensors", kernels=kernels)
        out[name] = _logits(model)
        if kernels == "always":  # the decode step went through the kernel, not the reference path
            assert model.model.layers[0].mlp.kernel_skip_reason(torch.zeros(1, 1, HIDDEN, device=DEVICE)) is None
        if name == "d":  # predictors: this rank's rows of U and b, all of V
            ffn = model.model.layers[1].mlp
            assert ffn.predictor_U.shape[0] == ffn.predictor_b.shape[0] == INTER // WORLD
            assert ffn.predictor_V.shape[0] == HIDDEN
        # the artifact saved on the sharded model is the whole model's (every rank calls, rank 0 writes)
        countdown.save_sparsity(model, tmp / f"{name}-{engine}-back.safetensors")
        countdown.unsparsify(model)
    out["dense_after"] = _logits(model)
    for what, call in [("topk", lambda: countdown.sparsify(model, "m-countdown", 0.5, mode="topk")),
                       ("calibrate", lambda: countdown.calibrate(model, "m-countdown", tokens(2, 8)))]:
        try:
            call()
            errors[what] = None
        except ValueError as err:
            errors[what] = str(err)
    torch.save({"logits": out, "errors": errors}, tmp / f"out-{engine}-{rank}.pt")


def _kernels(case: str) -> str:
    """The single-process reference runs the case's path on the GPU; on the CPU "auto" is the reference path."""
    return case if DEVICE == "cuda" else "auto"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Artifacts calibrated on the unsharded model, and its logits for each."""
    tmp = tmp_path_factory.mktemp("tp")
    model = tiny_model("llama")
    model.save_pretrained(tmp / "model")
    model.to(DEVICE)
    cal_ids = tokens(6, 16)
    g = torch.Generator().manual_seed(3)
    r = 8
    preds = Predictors([{"V": torch.randn(HIDDEN, r, generator=g) / HIDDEN ** 0.5,
                         "U": torch.randn(INTER, r, generator=g) / r ** 0.5,
                         "b": torch.randn(INTER, generator=g) * 0.1} for _ in range(2)], SPARSITY)
    expected = {"dense": _logits(model)}
    for name, method, kernels in CASES:
        kwargs = {"predictors": preds} if method == "d-countdown" else {}
        countdown.sparsify(model, method, SPARSITY, calibration=cal_ids, positions="all", progress=False,
                           kernels=_kernels(kernels), **kwargs)
        countdown.save_sparsity(model, tmp / f"{name}.safetensors")
        expected[name] = _logits(model)
        assert not torch.allclose(expected[name]["step"], expected["dense"]["step"], atol=1e-3)  # it masks
        countdown.unsparsify(model)
    return tmp, model, expected


def test_tp2_sparse_logits_equal_single_process(reference):
    tmp, model, expected = reference
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    for engine in ENGINES:
        _check(tmp, model, expected, engine)


def _check(tmp, model, expected, engine):
    for rank in range(WORLD):
        got = torch.load(tmp / f"out-{engine}-{rank}.pt")
        logits = got["logits"]
        for name in ["dense", *[c[0] for c in CASES]]:
            for kind in ("full", "step"):
                torch.testing.assert_close(logits[name][kind], expected[name][kind], rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{engine} rank {rank} {name} {kind}: {m}")
        for kind in ("full", "step"):  # unsparsify restores the TP model's dense logits
            torch.testing.assert_close(logits["dense_after"][kind], logits["dense"][kind], rtol=0, atol=0)
        assert "top-k" in got["errors"]["topk"] and "tensor-parallel" in got["errors"]["topk"]
        assert "unsharded model" in got["errors"]["calibrate"]
    # "and back": the artifact the sharded model saved loads on the unsharded model with the same logits
    for name, _, kernels in CASES:
        countdown.load_sparsity(model, tmp / f"{name}-{engine}-back.safetensors", kernels=_kernels(kernels))
        got = _logits(model)
        countdown.unsparsify(model)
        for kind in ("full", "step"):  # exact on the CPU; the GPU kernel's fp32 atomics add in any order
            tol = 1e-6 if DEVICE == "cuda" else 0.0
            torch.testing.assert_close(got[kind], expected[name][kind], rtol=tol, atol=tol)


def test_unsharded_model_is_untouched_by_parallel_helpers():
    from countdown import parallel

    model = tiny_model("llama")
    sites = countdown.ffn_sites(model)
    assert parallel.check(sites, countdown.get_method("m-countdown"), "topk") == [None, None]
    parallel.refuse_sharded(sites, "calibration")  # no error
    w = sites[0].gated_weights()[0]
    assert parallel.local(w) is w and torch.equal(parallel.leading_rows(w, 4), w[:4])
