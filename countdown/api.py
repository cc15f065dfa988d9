"""The public entry points: sparsify a model, undo it, save and load the calibration artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import ffn
from .calibrate import Calibration, collect_many, sequential_thresholds
from .data import token_windows
from .kernel_path import KERNEL_MODES, set_kernels
from .methods import get_method
from .models import ffn_sites, fingerprint

ARTIFACT_FORMAT = "countdown-sparsity"
ARTIFACT_VERSION = 1
MODES = ("threshold", "topk")

CalibrationInput = Union[str, Sequence[str], torch.Tensor, Sequence[torch.Tensor], Calibration]


class AlreadySparsifiedError(ValueError):
    """sparsify() was called on a model that already carries sparse FFNs."""


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of FFN neurons skipped per token), got {sparsity}")
    return float(sparsity)


def is_sparsified(model: nn.Module) -> bool:
    return bool(ffn.sparse_modules(model))


def calibration_windows(
    calibration: CalibrationInput, tokenizer, seq_len: int, max_windows: int | None
) -> torch.Tensor:
    """Turn texts or token batches into [n, seq_len] token windows, with clear errors for bad input."""
    if isinstance(calibration, torch.Tensor):
        windows = calibration if calibration.dim() == 2 else calibration.reshape(1, -1)
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, torch.Tensor) for c in calibration):
        windows = torch.cat([c.reshape(1, -1) if c.dim() == 1 else c for c in calibration])
    else:
        texts = [calibration] if isinstance(calibration, str) else list(calibration or [])
        text = "\n\n".join(t for t in texts if isinstance(t, str))
        if not text.strip():
            raise ValueError("calibration text is empty: pass real text (str or list of str) or token batches")
        if tokenizer is None:
            raise ValueError("calibration is text, so sparsify() needs tokenizer=...")
        return token_windows(tokenizer, text, seq_len, max_windows=max_windows)
    if windows.numel() == 0:
        raise ValueError("calibration token batches are empty")
    if windows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"calibration token batches must be integer token ids, got {windows.dtype}")
    return windows.long()[:max_windows] if max_windows else windows.long()


def calibrate(
    model: nn.Module,
    method: str,
    calibration: CalibrationInput,
    tokenizer=None,
    *,
    seq_len: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> Calibration:
    """Collect the method's score statistics on calibration text; reusable for any target sparsity."""
    if isinstance(calibration, Calibration):
        return calibration
    return calibrate_methods(model, [method], calibration, tokenizer, seq_len=seq_len, max_windows=max_windows,
                             batch_size=batch_size, predictors=predictors, progress=progress)[method]


def calibrate_methods(
    model: nn.Module,
    methods: Sequence[str],
    calibration: CalibrationInput,
    tokenizer=None,
    *,
    seq_len: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
) -> dict[str, Calibration]:
    """`calibrate` for several methods in one pass over the calibration text: {method: Calibration}."""
    ms = [get_method(name) for name in methods]
    sites = ffn_sites(model)
    if is_sparsified(model):
        raise AlreadySparsifiedError("calibration needs the dense model; call countdown.unsparsify(model) first")
    if any(m.needs_predictor for m in ms):
        _check_predictors(predictors, sites)
    windows = calibration_windows(calibration, tokenizer, seq_len, max_windows)
    return collect_many(model, sites, [m for m in ms if m.sites], windows, batch_size, predictors, progress)


def sparsify(
    model: nn.Module,
    method: str = "m-countdown",
    sparsity: float = 0.5,
    *,
    calibration: CalibrationInput | None = None,
    tokenizer=None,
    mode: str | None = None,
    seq_len: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    predictors: list[dict[str, torch.Tensor]] | None = None,
    progress: bool = True,
    kernels: str = "auto",
) -> nn.Module:
    """Replace every FFN of ``model`` by a sparse one and return the same model object.

    ``mode="topk"`` keeps exactly the ``1 - sparsity`` highest-scoring neurons of every token (needs no
    calibration); ``mode="threshold"`` masks scores below per-layer thresholds calibrated on
    ``calibration`` (texts with ``tokenizer``, token batches, or a `Calibration`). Default: threshold
    when calibration is given, else top-k. ``d-countdown`` needs ``predictors`` (see
    `countdown.train_predictors`). ``kernels="auto"`` runs single-token decode steps on CUDA through
    the Triton kernels (`countdown.kernel_path`); "off" keeps the reference path everywhere. Every
    input is checked before the model is touched.
    """
    m = get_method(method)
    sparsity = check_sparsity(sparsity)
    if kernels not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}")
    sites = ffn_sites(model)
    if is_sparsified(model):
        raise AlreadySparsifiedError("model is already sparsified; call countdown.unsparsify(model) first")
    mode = mode or ("threshold" if calibration is not None else "topk")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if m.needs_predictor:
        _check_predictors(predictors, sites)
    thresholds = None
    if mode == "threshold" and m.sites:
        if calibration is None:
            raise ValueError("mode='threshold' needs calibration=... (texts or token batches); or use mode='topk'")
        cal = calibrate(model, method, calibration, tokenizer, seq_len=seq_len, max_windows=max_windows,
                        batch_size=batch_size, predictors=predictors, progress=progress)
        if cal.method != m.name:
            raise ValueError(f"calibration was collected for method {cal.method!r}, not {m.name!r}")
        _check_fingerprint(cal.fingerprint, fingerprint(model), "calibration")
        if len(m.sites) > 1:
            thresholds = sequential_thresholds(model, sites, m, cal, sparsity, predictors, batch_size, progress)
        else:
            thresholds = cal.thresholds(sparsity)
    _install(model, sites, m, sparsity, mode, thresholds, predictors)
    set_kernels(model, kernels)
    return model


def _install(model, sites, method, sparsity, mode, thresholds, predictors) -> None:
    maskers = [
        ffn.Masker(method.sites, sparsity, mode, thresholds[i] if thresholds is not None else None)
        for i in range(len(sites))
    ]
    ffn.install(model, sites, method, maskers, predictors if method.needs_predictor else None)


def _check_predictors(predictors, sites) -> None:
    if predictors is None:
        raise ValueError("method 'd-countdown' needs trained predictors: pass predictors=countdown.train_predictors(...)")
    if len(predictors) != len(sites):
        raise ValueError(f"got predictors for {len(predictors)} layers, the model has {len(sites)}")


def unsparsify(model: nn.Module) -> nn.Module:
    """Restore the model's original FFN modules."""
    ffn.remove(model)
    return model


def _check_fingerprint(found: dict, expected: dict, what: str) -> None:
    diffs = [f"{k}: {found.get(k)!r} != {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ValueError(f"this {what} was made for another model ({'; '.join(diffs)})")


def save_sparsity(model: nn.Module, path: str | Path) -> Path:
    """Write the model's sparsity configuration (thresholds, predictors, method, target, model
    fingerprint) to one safetensors file."""
    modules = ffn.sparse_modules(model)
    if not modules:
        raise ValueError("model is not sparsified: nothing to save")
    first = modules[0]
    tensors = {"thresholds": torch.stack([m.masker.thresholds.cpu() for m in modules]).contiguous()}
    for m in modules:
        for name, buf in m.named_buffers(recurse=False):
            if name.startswith("predictor_"):
                tensors[f"layers.{m.layer_idx}.{name}"] = buf.detach().cpu().contiguous()
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "method": first.method.name,
        "sparsity": first.masker.sparsity,
        "mode": first.masker.mode,
        "sites": list(first.masker.sites),
        "fingerprint": fingerprint(model),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={"countdown": json.dumps(meta)})
    return path


def read_artifact(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an artifact, or a clear error if it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sparsity artifact at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("countdown")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a countdown sparsity artifact")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: countdown metadata is corrupt: {err}") from err
    if meta.get("format") != ARTIFACT_FORMAT or meta.get("version") != ARTIFACT_VERSION:
        raise ValueError(f"{path}: unsupported artifact format {meta.get('format')!r} v{meta.get('version')!r}")
    return meta, tensors


def load_sparsity(model: nn.Module, path: str | Path) -> nn.Module:
    """Sparsify ``model`` exactly as the artifact at ``path`` says; refuses artifacts of other models."""
    meta, tensors = read_artifact(path)
    sites = ffn_sites(model)
    _check_fingerprint(meta["fingerprint"], fingerprint(model), f"sparsity artifact ({path})")
    if is_sparsified(model):
        raise AlreadySparsifiedError("model is already sparsified; call countdown.unsparsify(model) first")
    method = get_method(meta["method"])
    thresholds = tensors["thresholds"]
    if thresholds.shape[0] != len(sites):
        raise ValueError(f"{path}: thresholds for {thresholds.shape[0]} layers, model has {len(sites)}")
    predictors = None
    if method.needs_predictor:
        predictors = []
        for i in range(len(sites)):
            prefix = f"layers.{i}.predictor_"
            layer = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not layer:
                raise ValueError(f"{path}: method d-countdown but no predictor for layer {i}")
            predictors.append(layer)
    _install(model, sites, method, meta["sparsity"], meta["mode"], thresholds, predictors)
    return model
