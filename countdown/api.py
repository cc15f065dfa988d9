"""The public lifecycle: sparsify a model, undo it, save and load what was done."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from . import artifact, ffn, parallel
from . import attention as attention_mod
from .allocation import ATTENTION_SITES, Allocation
from .calibrate import Calibration, collect_many, sequential_thresholds
from .data import calibration_windows
from .ffn import is_sparsified
from .methods import Method, check_ffn_kind, check_sparsity, get_method
from .options import KernelPolicy
from .models import FFNSite, ffn_sites, fingerprint
from .predictor import Predictors
from .spec import Protocol, SparsitySpec, check_protocol

MODES = ("threshold", "topk")

SparsityInput = Union[float, Allocation, Sequence[float]]
CalibrationInput = Union[str, Sequence[str], torch.Tensor, Sequence[torch.Tensor], Calibration]
PredictorInput = Union[Predictors, Sequence[dict[str, torch.Tensor]]]


class AlreadySparsifiedError(ValueError):
    """sparsify() was called on a model that already carries sparse FFNs."""


def calibrate(
    model: nn.Module,
    method: str,
    calibration: CalibrationInput,
    tokenizer=None,
    *,
    seq_len: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    predictors: PredictorInput | None = None,
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
    predictors: PredictorInput | None = None,
    progress: bool = True,
    attention: bool = False,
) -> dict[str, Calibration]:
    """`calibrate` for several methods in one pass over the calibration text: {method: Calibration}.
    ``attention=True`` also records the attention projections' inputs (key "attention")."""
    ms = [get_method(name) for name in methods]
    sites = ffn_sites(model)
    parallel.refuse_sharded(sites, "calibration")  # scores of one rank are a slice: quantiles need them all
    for m in ms:
        check_ffn_kind(m, {site.kind for site in sites})
    if is_sparsified(model):
        raise AlreadySparsifiedError("calibration needs the dense model; call countdown.unsparsify(model) first")
    layers = _predictor_layers(predictors, sites, None) if any(m.needs_predictor for m in ms) else None
    windows = calibration_windows(calibration, tokenizer, seq_len, max_windows)
    attention_sites = attention_mod.check_supported(model) if attention else None
    return collect_many(model, sites, [m for m in ms if m.sites], windows, batch_size, layers, progress,
                        attention_sites)


def sparsify(
    model: nn.Module,
    method: str = "m-countdown",
    sparsity: SparsityInput = 0.5,
    *,
    calibration: CalibrationInput | None = None,
    tokenizer=None,
    mode: str | None = None,
    protocol: Protocol | Mapping[str, object] | None = None,
    seq_len: int = 512,
    max_windows: int | None = 32,
    batch_size: int = 1,
    predictors: PredictorInput | None = None,
    attention: float | Allocation | Sequence[float] | None = None,
    progress: bool = True,
    kernels: str | KernelPolicy = "auto",
    **protocol_options,
) -> nn.Module:
    """Replace every FFN of ``model`` by a sparse one and return the same model object.

    ``mode="topk"`` keeps exactly the ``1 - sparsity`` highest-scoring neurons of every token (needs no
    calibration); ``mode="threshold"`` masks scores below per-layer thresholds calibrated on
    ``calibration`` (texts with ``tokenizer``, token batches, or a `Calibration`; ``seq_len``,
    ``max_windows``, ``batch_size`` and ``progress`` shape that pass). Default: threshold when
    calibration is given, else top-k.

    ``protocol``: how positions, counts, ties and thresholds are decided, one `countdown.Protocol`
    (``countdown.OFFICIAL_PROTOCOL`` is the official code's; default ``Protocol()``, ours). Its options
    may also be given one by one as keywords, which override ``protocol``'s (`SparsitySpec` explains
    each): ``positions="decode"`` (default: what serves generation) keeps multi-token forwards
    (prefill) dense and masks decode steps, as the official COUNTDOWN code does, and
    `countdown.perplexity` then keeps each window's context dense; ``"all"`` masks every position of
    every forward (the strict evaluation). ``count_rule`` ("floor": drop ``int(D*s)`` per token,
    "round"), ``ties`` (top-k: "exact" k, or "strict" ``score > k-th smallest``), ``threshold_rule``
    ("pooled" quantile, "mean-kth", "median-kth") and ``threshold_adjust`` (added to every threshold).

    ``d-countdown`` needs ``predictors`` from ``countdown.train_predictors(model, sparsity, ...)``,
    trained for the same sparsity; its default threshold rule is the predictors'
    (``Predictors.keep_rule``): "zero" (keep logit > 0, nothing to calibrate, the sparsity is what the
    classifier gives) for ``recipe="official"``, else "pooled" (every other method: "pooled"). Methods
    with per-neuron statistics (``chess``) need ``calibration`` in top-k mode too. ``attention=a`` also
    skips a fraction ``a`` of the input channels of every attention projection (q/k/v share one
    calibrated threshold per layer, o_proj has its own; TEAL model-wide is
    ``sparsify(model, "teal", 0.5, attention=0.5, calibration=...)``); it needs calibration text.
    ``kernels="auto"`` runs decode tokens on CUDA through the Triton kernels; "off" keeps the
    reference path everywhere; a `countdown.KernelPolicy` also picks kernel variants. Every input is checked before the model is touched.

    ``sparsity`` may be non-uniform: a `countdown.Allocation` (per layer, or per site and layer: the
    method's sites and, for attention input sparsity, "qkv" and "o") or a list of per-layer floats
    (every site of layer i at the i-th); ``attention`` likewise takes a per-layer list. Threshold mode
    calibrates every (layer, site) to its own target, top-k mode keeps each layer's own count. An
    allocation with every value ``s`` gives exactly what ``sparsity=s`` gives.
    """
    m = get_method(method)
    sites = ffn_sites(model)
    sparsity, attention, allocation = resolve_allocation(m, sparsity, attention, len(sites))
    kernels = KernelPolicy.of(kernels)
    protocol = _protocol_for(m, predictors, protocol, protocol_options)
    check_ffn_kind(m, {site.kind for site in sites})
    if is_sparsified(model):
        raise AlreadySparsifiedError("model is already sparsified; call countdown.unsparsify(model) first")
    logit_rule = protocol.threshold_rule == "zero" and mode != "topk"  # logit > 0: nothing to calibrate
    if logit_rule and allocation is not None:
        raise ValueError("threshold_rule='zero' keeps predictor logits > 0 whatever the target: a per-layer "
                         "allocation has no effect under it; use threshold_rule='pooled' (or mode='topk')")
    mode = mode or ("threshold" if calibration is not None or logit_rule else "topk")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    parallel.check(sites, m, mode)
    # predictors trained for one sparsity serve an allocation's per-layer thresholds (its targets differ)
    trained_for = sparsity if allocation is None else None
    layers = _predictor_layers(predictors, sites, trained_for) if m.needs_predictor else None
    collect = dict(seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, progress=progress)
    spec = SparsitySpec(m.name, sparsity, mode, m.sites, **protocol, attention=attention, allocation=allocation)
    attention_thresholds = None
    if attention is not None:
        attention_mod.check_supported(model)
        if calibration is None or isinstance(calibration, Calibration) or mode != "threshold":
            raise ValueError("attention=... needs calibration text or token batches (its thresholds are calibrated "
                             "in threshold mode; a Calibration object holds one method's scores only)")
        cals = calibrate_methods(model, [m.name], calibration, tokenizer, predictors=layers, attention=True, **collect)
        attention_thresholds = cals["attention"].thresholds(spec.attention_targets())
        calibration = cals.get(m.name, calibration)  # the same pass serves the FFN's thresholds
    thresholds, stats = _thresholds(model, sites, m, spec, calibration, tokenizer, layers, logit_rule, collect)
    _install(model, sites, m, spec, thresholds, layers, stats)
    if attention_thresholds is not None:
        attention_mod.install(model, spec, attention_thresholds)
    set_kernels(model, kernels)
    return model


def resolve_allocation(method: Method, sparsity: SparsityInput, attention: float | Allocation | Sequence[float] | None,
                       n_layers: int) -> tuple[float, float | None, Allocation | None]:
    """(mean FFN sparsity, mean attention sparsity or None, the allocation or None) for ``sparsify``'s
    ``sparsity`` and ``attention`` arguments. Plain numbers stay uniform (allocation None); an
    `Allocation` or a list becomes one allocation naming every site it covers (the method's, and
    "qkv"/"o" with attention sparsity), checked against the model's layers and the method's sites."""
    def given(value) -> bool:
        return isinstance(value, (Allocation, list, tuple))

    if not given(sparsity) and not given(attention):
        return check_sparsity(sparsity), None if attention is None else check_sparsity(attention), None
    ffn_alloc = Allocation(sparsity) if given(sparsity) else Allocation.uniform(check_sparsity(sparsity), n_layers)
    ffn_alloc.check_sites((*method.sites, *ATTENTION_SITES), method.name)
    ffn_alloc.table(method.sites, n_layers)  # the layer count, and a value for every site of the method
    columns = {site: list(ffn_alloc.site_values(site)) for site in method.sites}
    attention_named = [s for s in ATTENTION_SITES if ffn_alloc.sites is not None and s in ffn_alloc.sites]
    attention_alloc = None
    if attention_named:
        if attention is not None:
            raise ValueError("the allocation gives the attention sites ('qkv', 'o') their sparsity: leave attention=None")
        attention_alloc = ffn_alloc
    elif attention is not None:
        attention_alloc = Allocation(attention) if given(attention) else Allocation.uniform(check_sparsity(attention),
                                                                                             n_layers)
        attention_alloc.check_sites(ATTENTION_SITES, "attention")
    if attention_alloc is not None:
        columns.update({site: list(values) for site, values in
                        zip(ATTENTION_SITES, zip(*attention_alloc.table(ATTENTION_SITES, n_layers)))})
    if not columns:  # a method without sites (dense): nothing to allocate
        return ffn_alloc.mean(), None, None
    allocation = Allocation(columns)
    mean = allocation.mean(method.sites) if method.sites else 0.0
    return mean, allocation.mean(ATTENTION_SITES) if attention_alloc is not None else None, allocation


def _protocol_for(method: Method, predictors: PredictorInput | None, protocol: Mapping[str, object] | None,
                  options: dict) -> Protocol:
    """``protocol`` with the keyword ``options`` applied and the method's default threshold rule filled in."""
    protocol = Protocol(**protocol) if protocol is not None and not isinstance(protocol, Protocol) else protocol
    protocol = (protocol or Protocol()).replace(**options)
    if protocol.threshold_rule is None:
        default = getattr(predictors, "keep_rule", "pooled") if method.needs_predictor else "pooled"
        protocol = protocol.replace(threshold_rule=default)
    protocol.check_method(method)
    return protocol


def _thresholds(model: nn.Module, sites: list[FFNSite], method: Method, spec: SparsitySpec,
                calibration: CalibrationInput | None, tokenizer, layers: list[dict] | None, logit_rule: bool,
                collect: dict) -> tuple[torch.Tensor | None, list[dict] | None]:
    """(thresholds [layers, sites] or None, per-neuron statistics or None) for ``spec``: none in top-k
    mode; the threshold of the "zero" rule (logit > 0, nothing to calibrate); or from calibration, one
    site after another for multi-site methods, all sites at once otherwise (statistics too)."""
    if logit_rule:
        return torch.full((len(sites), len(method.sites)), spec.threshold_adjust), None
    threshold_mode = spec.mode == "threshold"
    if not (threshold_mode and method.sites) and not method.stats:
        return None, None
    if calibration is None:
        if not threshold_mode:
            raise ValueError(f"method {method.name!r} measures per-neuron statistics ({', '.join(method.stats)}) on "
                             "calibration text, also in top-k mode: pass calibration=... (texts or token batches)")
        raise ValueError("mode='threshold' needs calibration=... (texts or token batches); or use mode='topk'")
    cal = calibrate(model, method.name, calibration, tokenizer, predictors=layers, **collect)
    if cal.method != method.name:
        raise ValueError(f"calibration was collected for method {cal.method!r}, not {method.name!r}")
    artifact.check_fingerprint(cal.fingerprint, fingerprint(model), "calibration")
    stats = None
    if method.stats:
        if len(cal.stats) != len(sites) or any(name not in layer for layer in cal.stats for name in method.stats):
            raise ValueError(f"this calibration lacks the per-neuron statistics {method.stats} of method "
                             f"{method.name!r}; collect it with countdown.calibrate(model, method, ...)")
        stats = cal.stats
    if threshold_mode and len(method.sites) > 1:
        return sequential_thresholds(model, sites, method, cal, spec, layers, collect["batch_size"],
                                     collect["progress"]), stats
    if threshold_mode:
        return cal.thresholds(spec.targets(), spec.threshold_rule, spec.threshold_adjust, spec.count_rule), stats
    return None, stats


def set_kernels(model: nn.Module, kernels: str | KernelPolicy = "auto") -> int:
    """Store a `countdown.KernelPolicy` on every sparse FFN and input-sparse attention projection. Its
    ``mode`` (a string alone is the mode): "auto" (Triton kernels for decode steps on CUDA, reference
    elsewhere), "off" (always the reference path) or "always" (kernels wherever Triton runs them, the
    CPU interpreter included); its other fields pick kernel variants. Lays the weights out for the
    kernels now, not inside a CUDA-graph capture or a torch.compile trace. Returns how many modules."""
    policy = KernelPolicy.of(kernels)
    return ffn.set_kernels(model, policy) + attention_mod.set_kernels(model, policy)


def _install(model: nn.Module, sites: list[FFNSite], method: Method, spec: SparsitySpec,
             thresholds: torch.Tensor | None, layers: list[dict] | None, stats: list[dict] | None = None) -> None:
    targets = spec.targets()
    per_layer = None if isinstance(targets, (int, float)) else targets
    rules = [ffn.Masker(spec, thresholds[i] if thresholds is not None else None,
                        per_layer[i] if per_layer is not None else None) for i in range(len(sites))]
    # under tensor parallelism each rank keeps its neurons' rows of the per-neuron tensors
    shards = [parallel.ffn_shard(site) for site in sites]
    layers = parallel.local_layers(layers, shards, parallel.PREDICTOR_ROWS)
    stats = parallel.local_layers(stats, shards, None)
    ffn.install(model, sites, method, rules, layers, spec, stats)
    if callable(getattr(model, "save_pretrained", None)) and "save_pretrained" not in vars(model):
        model.save_pretrained = _SavePretrainedWithSparsity(model)


def _predictor_layers(predictors: PredictorInput | None, sites: list[FFNSite],
                      sparsity: float | None) -> list[dict[str, torch.Tensor]]:
    """The per-layer predictor tensors, checked against the model and the target sparsity."""
    if predictors is None:
        raise ValueError("method 'd-countdown' needs trained predictors: pass "
                         "predictors=countdown.train_predictors(model, sparsity, calibration=..., tokenizer=...)")
    if len(predictors) != len(sites):
        raise ValueError(f"got predictors for {len(predictors)} layers, the model has {len(sites)}")
    trained = getattr(predictors, "sparsity", None)
    if sparsity is not None and trained is not None and abs(trained - sparsity) > 1e-9:
        raise ValueError(f"these predictors were trained for {trained:.0%} sparsity, not {sparsity:.0%}: "
                         f"train them for {sparsity:.0%} (countdown.train_predictors(model, {sparsity}, ...))")
    return list(predictors)


def unsparsify(model: nn.Module) -> nn.Module:
    """Restore the model's original FFN modules and dense attention projections."""
    ffn.remove(model)
    attention_mod.remove(model)
    if isinstance(vars(model).get("save_pretrained"), _SavePretrainedWithSparsity):
        del model.save_pretrained
    return model


def save_sparsity(model: nn.Module, path: str | Path) -> Path:
    """Write the model's sparsity (spec, thresholds, predictors, model fingerprint) to one safetensors file."""
    modules = ffn.sparse_modules(model)
    if not modules:
        raise ValueError("model is not sparsified: nothing to save")
    spec = modules[0].spec
    tensors = {"thresholds": torch.stack([m.masker.thresholds.cpu() for m in modules])}
    layers = [{name[len("predictor_"):]: buf for name, buf in m.named_buffers(recurse=False)
               if name.startswith("predictor_")} for m in modules]
    # a tensor-parallel model saves its whole model's tensors (gathered; every rank calls, rank 0 writes)
    shards = [getattr(m, "shard", None) for m in modules]
    if any(layers):
        tensors.update(artifact.predictor_tensors(parallel.full_layers(layers, shards, parallel.PREDICTOR_ROWS)))
    stats = [{name: m.stat(name) for name in m.method.stats} for m in modules]
    if any(stats):
        tensors.update(artifact.predictor_tensors(parallel.full_layers(stats, shards, None), prefix="stat_"))
    attention_thresholds = attention_mod.thresholds_of(model)
    if attention_thresholds is not None:
        tensors["attention_thresholds"] = attention_thresholds
    meta = {"kind": "sparsity", "method": spec.method, "sparsity": spec.sparsity, "mode": spec.mode,
            "sites": list(spec.sites), **artifact.protocol_meta(spec), "attention": spec.attention,
            "allocation": spec.allocation.to_meta() if spec.allocation is not None else None,
            "fingerprint": fingerprint(model)}
    if any(shards) and not parallel.is_writer():
        return Path(path)
    return artifact.write(path, tensors, meta)


def load_sparsity(model: nn.Module, path: str | Path, *, kernels: str | KernelPolicy = "auto") -> nn.Module:
    """Sparsify ``model`` exactly as the artifact at ``path`` says; refuses artifacts of other models.

    ``path``: an artifact file, or a checkpoint folder written by ``save_pretrained`` on a sparsified
    model (its config names the artifact beside the weights)."""
    if Path(path).is_dir():
        path = saved_artifact(path)
    meta, tensors = artifact.read(path)
    sites = ffn_sites(model)
    allocation = artifact.allocation_from_meta(meta, path)
    if allocation is not None and allocation.n_layers != len(sites):
        raise ValueError(f"sparsity artifact ({path}) allocates sparsity to {allocation.n_layers} layers, this "
                         f"model has {len(sites)}: it was made for another model")
    artifact.check_fingerprint(meta["fingerprint"], fingerprint(model), f"sparsity artifact ({path})")
    if is_sparsified(model):
        raise AlreadySparsifiedError("model is already sparsified; call countdown.unsparsify(model) first")
    method = get_method(meta["method"])
    check_ffn_kind(method, {site.kind for site in sites})
    thresholds = tensors["thresholds"]
    if thresholds.shape[0] != len(sites):
        raise ValueError(f"{path}: thresholds for {thresholds.shape[0]} layers, model has {len(sites)}")
    layers = artifact.predictor_layers(tensors, len(sites), path) if method.needs_predictor else None
    stats = artifact.predictor_layers(tensors, len(sites), path, prefix="stat_") if method.stats else None
    parallel.check(sites, method, meta["mode"])
    attention = meta.get("attention")
    if attention is not None:
        attention_mod.check_supported(model)
        if "attention_thresholds" not in tensors:
            raise ValueError(f"{path}: attention sparsity {attention} but no attention thresholds")
    protocol = artifact.protocol_from_meta(meta)
    check_protocol(**protocol)
    spec = SparsitySpec(method.name, meta["sparsity"], meta["mode"], method.sites, **protocol, attention=attention,
                        allocation=allocation)
    _install(model, sites, method, spec, thresholds, layers, stats)
    if attention is not None:
        attention_mod.install(model, spec, tensors["attention_thresholds"])
    set_kernels(model, kernels)
    return model


# -- transformers' save_pretrained / from_pretrained ----------------------------------------------

SAVED_ARTIFACT = "countdown_sparsity.safetensors"  # written beside the weights by save_pretrained
CONFIG_KEY = "countdown_sparsity"  # config.json entry naming it; plain transformers ignores it


class _SavePretrainedWithSparsity:
    """``model.save_pretrained`` of a sparsified model: transformers' own save (weights, config: the
    dense model, state_dict keys unchanged), plus the sparsity artifact beside the weights, named in
    config.json under ``countdown_sparsity``. `from_pretrained` / `load_sparsity(model, folder)` read it back;
    plain ``AutoModelForCausalLM.from_pretrained`` loads the dense model (an unknown config key is kept, unused)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory: str | Path, *args, **kwargs):
        model = self.model
        spec = ffn.sparsity_spec(model)
        if spec is None:  # unsparsified behind our back: a dense save
            return type(model).save_pretrained(model, save_directory, *args, **kwargs)
        setattr(model.config, CONFIG_KEY, {"file": SAVED_ARTIFACT, "method": spec.method, "sparsity": spec.sparsity,
                                           "mode": spec.mode, "protocol": spec.protocol,
                                           "allocation": spec.allocation.summary() if spec.allocation else None})
        try:
            out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        finally:
            delattr(model.config, CONFIG_KEY)  # the in-memory config stays the dense model's
        if kwargs.get("is_main_process", True):
            save_sparsity(model, Path(save_directory) / SAVED_ARTIFACT)
        return out


def saved_artifact(folder: str | Path) -> Path:
    """The sparsity artifact of a checkpoint folder saved from a sparsified model (see `from_pretrained`)."""
    import json

    folder = Path(folder)
    config = folder / "config.json"
    entry = json.loads(config.read_text()).get(CONFIG_KEY) if config.is_file() else None
    if not isinstance(entry, dict) or not entry.get("file"):
        raise ValueError(f"{folder} holds no countdown sparsity: its config.json has no {CONFIG_KEY!r} entry "
                         "(save_pretrained of a sparsified model writes one); pass the artifact file instead")
    return folder / entry["file"]


def has_saved_sparsity(folder: str | Path) -> bool:
    """Whether ``folder`` is a checkpoint saved from a sparsified model."""
    try:
        return saved_artifact(folder).is_file()
    except (ValueError, OSError):
        return False


def from_pretrained(folder: str | Path, *, kernels: str | KernelPolicy = "auto", **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)``, sparsified again as it was saved (if it
    was saved from a sparsified model: ``model.save_pretrained(folder)``); otherwise the dense model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if CONFIG_KEY in vars(model.config):  # the artifact is ours to apply, not a config attribute
        delattr(model.config, CONFIG_KEY)
    if has_saved_sparsity(folder):
        load_sparsity(model, folder, kernels=kernels)
    return model.eval()
