"""The sparsity artifact: one safetensors file with JSON metadata. The only module that writes,
reads or validates it.

Tensors: ``thresholds`` [L, n_sites] (float32) for a full artifact, per layer
``layers.{i}.predictor_{V,U,b}`` (low-rank) or ``predictor_{W,b}`` (bitlinear) for D-COUNTDOWN
predictors, ``layers.{i}.stat_<name>`` ([I] float32)
for per-neuron calibration statistics (CHESS's ``up_abs_mean``), and ``attention_thresholds`` [L, 2]
for attention input sparsity. Metadata (key ``countdown``): format, version, kind ("sparsity" or
"predictors"), method, sparsity (target; its mean under an allocation), mode, sites, attention (its
sparsity or null), allocation (per-layer, per-site targets: {"sites": [...], "values": [[...] per layer]},
or null when uniform), the evaluation
protocol (positions, count_rule, ties, threshold_rule, threshold_adjust: see `countdown.spec.SparsitySpec`),
predictor_sparsity (the target the predictors were trained for), the model fingerprint, and for
predictor files the predictor_recipe ("countdown" | "official"), predictor_kind ("lowrank" |
"bitlinear") and the per-layer training reports.

Artifacts written before the protocol was recorded lack those keys; they were made with positions
"all", top-k dropping round(D*s) neurons with exact ties, and pooled thresholds, which is what
`protocol_from_meta` reads them as.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .allocation import Allocation

FORMAT = "countdown-sparsity"
VERSION = 1
_META_KEY = "countdown"


def write(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) to ``path``; returns the path."""
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata={_META_KEY: json.dumps(meta)})
    return path


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an artifact, or a clear error if it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sparsity artifact at {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a countdown sparsity artifact")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: countdown metadata is corrupt: {err}") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported artifact format {meta.get('format')!r} v{meta.get('version')!r}")
    return meta, tensors


# what an artifact without protocol keys was made with (before they were recorded)
_LEGACY_PROTOCOL = {"positions": "all", "count_rule": "round", "ties": "exact", "threshold_rule": "pooled",
                    "threshold_adjust": 0.0}


def protocol_meta(spec) -> dict:
    """The protocol fields of a `SparsitySpec` as artifact metadata."""
    return {key: getattr(spec, key) for key in _LEGACY_PROTOCOL}


def protocol_from_meta(meta: dict) -> dict:
    """The protocol an artifact was made with (keyword arguments of `SparsitySpec`)."""
    return {key: meta.get(key, default) for key, default in _LEGACY_PROTOCOL.items()}


def allocation_from_meta(meta: dict, path: str | Path):
    """The artifact's per-layer allocation (`countdown.Allocation`), or None when it is uniform."""
    raw = meta.get("allocation")
    if raw is None:
        return None
    try:
        return Allocation.from_meta(raw)
    except (KeyError, TypeError, IndexError, ValueError) as err:
        raise ValueError(f"{path}: its allocation metadata is corrupt: {err}") from err


def check_fingerprint(found: dict, expected: dict, what: str) -> None:
    """Refuse an artifact (or calibration) made for another model, naming what differs."""
    diffs = [f"{k}: {found.get(k)!r} != {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ValueError(f"this {what} was made for another model ({'; '.join(diffs)})")


def predictor_tensors(layers: list[dict[str, torch.Tensor]], prefix: str = "predictor_") -> dict[str, torch.Tensor]:
    """The artifact's tensors for per-layer predictors (or, with ``prefix="stat_"``, statistics)."""
    return {f"layers.{i}.{prefix}{k}": v for i, layer in enumerate(layers) for k, v in layer.items()}


def predictor_layers(tensors: dict[str, torch.Tensor], n_layers: int, path: str | Path,
                     prefix: str = "predictor_") -> list[dict[str, torch.Tensor]]:
    """Per-layer predictor (or ``prefix="stat_"`` statistics) tensors back from an artifact; every
    layer must have them."""
    out = []
    for i in range(n_layers):
        key = f"layers.{i}.{prefix}"
        layer = {k[len(key):]: v for k, v in tensors.items() if k.startswith(key)}
        if not layer:
            raise ValueError(f"{path}: no {prefix[:-1]} tensors for layer {i}")
        out.append(layer)
    return out
