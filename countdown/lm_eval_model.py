"""countdown as an lm-evaluation-harness model: ``lm_eval.simple_evaluate(model="countdown", ...)``.

    import lm_eval
    import countdown.lm_eval_model  # registers "countdown" (lm-eval 0.4.13 reads no plugin entry points)
    from countdown.tasks import task_manager

    out = lm_eval.simple_evaluate(
        model="countdown",
        model_args="pretrained=smollm2,method=m-countdown,sparsity=0.7,positions=decode",
        tasks=["countdown_bigbench_emoji_movie_cloze"], task_manager=task_manager())
    out["config"]["countdown"]  # method, protocol, measured sparsity, dense-predicted scored tokens

Registration: importing this module registers `CountdownLM` through lm-eval's ``register_model``. The package also declares it under the ``lm_eval.models`` entry-point group
(pyproject.toml), which lm-eval releases with plugin discovery read on their own (``lm-eval run
--model countdown`` with no import); 0.4.13 has no such discovery, so there ``python -m
countdown.lm_eval_model run --model countdown ...`` runs lm-eval's command line with the model
registered. countdown's offline tasks need ``--include_path`` (`countdown.tasks.TASKS_DIR`) or
``task_manager=countdown.tasks.task_manager()``.

``model_args`` (besides HFLM's own, e.g. ``batch_size``, ``max_length``):

* ``pretrained``: a built-in name (``smollm2``, see `countdown.loading.load`), a GGUF file, a
  checkpoint folder (one saved by ``save_pretrained`` on a sparsified model brings its sparsity
  back by itself) or a Hub id; or, from Python, a model object (with ``tokenizer=``).
* ``sparsity_file``: an artifact from ``countdown calibrate`` / `countdown.save_sparsity`; or
  ``method`` + ``sparsity`` (+ ``mode``, ``positions``, ``official``, ``calibration`` = a corpus
  name or text file for threshold mode, ``calibration_windows``, ``predictors`` = a predictor
  artifact for d-countdown, ``attention``); ``kernels``; ``device``, ``dtype``; ``measure``.

Which positions are sparse follows the model's `SparsitySpec.positions`. With ``"decode"`` a
log-likelihood request runs its context densely and its continuation sparsely, as the official
COUNTDOWN harness does (its ``sparse_out_mask[i, :len(context)] = False``): the first continuation
token is predicted by the last context position, which is dense, and the later ones by sparse
positions. Generative tasks (gsm8k) prefill densely and decode sparsely. ``"all"``: every position
of every forward is sparse. The results say, per task, which fraction of scored tokens came from a
dense position, and the FFN sparsity measured over the whole evaluation (``measure=True``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from torch import nn

from . import api, evaluate, ffn, loading
from . import attention as attention_mod
from .spec import OFFICIAL_PROTOCOL

MODEL_NAME = "countdown"


def _calibration_text(spec: str) -> str:
    from . import data

    if spec in data.CORPORA:
        return data.calibration_text(spec)
    if Path(spec).is_file():
        return data.read_text_file(spec)
    raise ValueError(f"calibration={spec!r} is neither a known corpus ({', '.join(data.CORPORA)}) nor a text file")


def prepare(model: nn.Module, tokenizer: Any, *, sparsity_file: str | Path | None = None, method: str | None = None,
            sparsity: float = 0.5, mode: str | None = None, positions: str = "decode", official: bool = False,
            calibration: str | None = None, calibration_windows: int = 8, seq_len: int = 512,
            predictors: str | Path | None = None, attention_sparsity: float | None = None,
            kernels: str = "auto") -> nn.Module:
    """Sparsify ``model`` in place as the lm-eval model arguments say (nothing for method None/"dense")."""
    if sparsity_file is not None:
        if method not in (None, "dense"):
            raise ValueError("give either sparsity_file= (a calibrated artifact) or method= (+ sparsity=), not both")
        return api.load_sparsity(model, sparsity_file, kernels=kernels)
    if method in (None, "dense"):
        return model
    protocol = dict(OFFICIAL_PROTOCOL) if official else {"positions": positions}
    text = _calibration_text(calibration) if calibration is not None else None
    trained = None
    if predictors is not None:
        from .predictor import load_predictors

        trained = load_predictors(model, predictors)
    return api.sparsify(model, method, sparsity, calibration=text, tokenizer=tokenizer, mode=mode, seq_len=seq_len,
                        max_windows=calibration_windows, predictors=trained, attention=attention_sparsity,
                        kernels=kernels, progress=False, **protocol)


class CountdownLM(HFLM):
    """lm-eval's HFLM over a countdown-sparsified model: the sparse FFNs follow the model's ``positions``
    policy in log-likelihood requests (context dense, continuation sparse under "decode"), the FFN
    sparsity is measured over the evaluation, and per task the scored tokens predicted by a dense
    position are counted. See the module docstring for the arguments."""

    def __init__(self, pretrained: str | nn.Module = loading.DEFAULT_MODEL, tokenizer: Any = None, *,
                 sparsity_file: str | None = None, method: str | None = None, sparsity: float = 0.5,
                 mode: str | None = None, positions: str = "decode", official: bool = False,
                 calibration: str | None = None, calibration_windows: int = 8, seq_len: int = 512,
                 predictors: str | None = None, attention: float | None = None, kernels: str = "auto",
                 device: str | None = None, dtype: str = "float32", measure: bool = True, **kwargs: Any):
        if isinstance(pretrained, nn.Module):
            model = pretrained
            if tokenizer is None:
                raise ValueError("an in-memory model needs its tokenizer: CountdownLM(model, tokenizer=...)")
        else:
            model, loaded_tokenizer = loading.load(str(pretrained), device=device, dtype=dtype)
            if loaded_tokenizer is None:
                raise ValueError(f"{pretrained!r} has no tokenizer (random weights): lm-eval tasks need text")
            tokenizer = tokenizer or loaded_tokenizer
            saved = Path(str(pretrained)).is_dir() and api.has_saved_sparsity(str(pretrained))
            vars(model.config).pop(api.CONFIG_KEY, None)  # the artifact is applied here, not a config attribute
            if saved and sparsity_file is None and method in (None, "dense"):
                api.load_sparsity(model, str(pretrained), kernels=kernels)  # saved by save_pretrained when sparse
        prepare(model, tokenizer, sparsity_file=sparsity_file, method=method, sparsity=sparsity, mode=mode,
                positions=positions, official=official, calibration=calibration,
                calibration_windows=calibration_windows, seq_len=seq_len, predictors=predictors,
                attention_sparsity=attention, kernels=kernels)
        model.eval()
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        self.sparsity_file = str(sparsity_file) if sparsity_file is not None else None
        self.measure = measure
        self.scored_tokens: dict[str, tuple[int, int]] = {}  # task -> (scored, predicted densely)
        modules = ffn.sparse_modules(self.model)
        self._meters = [ffn.SparsityMeter() for _ in modules]  # over every request of the evaluation
        self._attention_meters = [ffn.SparsityMeter() for _ in attention_mod.sparse_projections(self.model)]
        self._n_dense: dict[tuple[int, ...], int] = {}  # request input tokens -> dense leading positions
        self._request_tasks: list[str | None] = []

    # -- what the results say -------------------------------------------------------------------
    def is_sparse(self) -> bool:
        return ffn.is_sparsified(self.model)

    def sparsity_report(self) -> dict:
        """The model's sparsity, its protocol, what was measured so far and the dense-predicted tokens."""
        spec = ffn.sparsity_spec(self.model)
        if spec is None:
            return {"method": "dense"}
        report: dict[str, Any] = {"method": spec.method, "target_sparsity": spec.sparsity, "mode": spec.mode,
                                  "positions": spec.positions, "protocol": spec.protocol,
                                  "attention": spec.attention, "sparsity_file": self.sparsity_file}
        modules = ffn.sparse_modules(self.model)
        if self.measure and any(m.seen for m in self._meters):
            report["measured"] = evaluate.measured_sparsity(modules, self._meters)
            projections = attention_mod.sparse_projections(self.model)
            for site in attention_mod.SITES:
                seen = [meter.measured((site,))[site] for p, meter in zip(projections, self._attention_meters)
                        if p.site == site and meter.seen.get(site)]
                if seen:
                    report["measured"].setdefault("attention_sparsity", {})[site] = sum(seen) / len(seen)
        report["tasks"] = {task: {"scored_tokens": scored, "dense_scored_tokens": dense,
                                  "dense_scored": dense / scored if scored else float("nan")}
                           for task, (scored, dense) in self.scored_tokens.items()}
        return report

    def get_model_info(self) -> dict:
        # HFLM's asks the Hub for the model's commit (a network call for a name that is no Hub id)
        info = {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype)}
        info[MODEL_NAME] = self.sparsity_report()
        return info

    @contextlib.contextmanager
    def _measuring(self):
        """The evaluation's meters on the sparse modules while requests run, removed afterwards (the
        kernels skip a module with a meter: lm-eval's forwards are multi-token, decode steps are few)."""
        owners = ffn.sparse_modules(self.model) + attention_mod.sparse_projections(self.model)
        meters = self._meters + self._attention_meters
        if not self.measure or len(owners) != len(meters) or any(m.meter is not None for m in owners):
            yield
            return
        for m, meter in zip(owners, meters):
            m.meter = meter
        try:
            yield
        finally:
            for m in owners:
                m.meter = None

    # -- lm-eval's request types --------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._request_tasks = [getattr(r, "task_name", None) for r in requests]
        try:
            with self._measuring():
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_tasks = []

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        with self._measuring():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._measuring():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    # -- the position policy in log-likelihood batches --------------------------------------------
    def _decode_protocol(self) -> bool:
        spec = ffn.sparsity_spec(self.model)
        return spec is not None and spec.positions == "decode"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        decode, sparse = self._decode_protocol(), self.is_sparse()
        tasks = self._request_tasks if len(self._request_tasks) == len(requests) else [None] * len(requests)
        self._n_dense = {}
        for (_, context, continuation), task in zip(requests, tasks):
            inp = (context + continuation)[-(self.max_length + 1):][:-1]  # as HFLM builds it
            # the context's positions in ``inp``: the last of them predicts the first continuation token
            n_dense = len(inp) - (len(continuation) - 1) if decode else 0
            key = tuple(inp)
            # requests with the same input share one forward (lm-eval's one-token cache): the
            # representative has the longest continuation, i.e. the fewest dense positions
            self._n_dense[key] = min(n_dense, self._n_dense.get(key, n_dense))
            if task is not None:
                first_scored = len(inp) - len(continuation)  # the position predicting the first continuation token
                dense_scored = max(0, min(n_dense, len(inp)) - first_scored) if sparse else len(continuation)
                scored, dense = self.scored_tokens.get(task, (0, 0))
                self.scored_tokens[task] = (scored + len(continuation), dense + dense_scored)
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._n_dense = {}

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is not None or labels is not None or not self._n_dense or not self._decode_protocol():
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        mask = self._sparse_positions(inps)
        if mask is None:  # lm-eval's batch-size probe (rows of ones): no request, nothing to keep dense
            return super()._model_call(inps)
        modules = ffn.sparse_modules(self.model)
        for m in modules:
            m.sparse_positions = mask
        try:
            return super()._model_call(inps)
        finally:
            for m in modules:
                m.sparse_positions = None

    def _sparse_positions(self, inps: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool: each right-padded row's continuation positions (context and padding dense);
        None if no row is a request's input."""
        mask = torch.zeros(inps.shape, dtype=torch.bool)
        matched = []
        for b, row in enumerate(inps.tolist()):
            length = len(row)
            while length and row[length - 1] == 0:  # HFLM pads with 0; a real trailing 0 is tried below
                length -= 1
            for n in range(length, len(row) + 1):
                n_dense = self._n_dense.get(tuple(row[:n]))
                if n_dense is not None:
                    mask[b, n_dense:n] = True
                    break
            matched.append(n_dense is not None)
        if not any(matched):
            return None
        if not all(matched):
            raise RuntimeError("positions='decode': a batch row matches no log-likelihood request; this "
                               "lm-eval version builds its batches unlike 0.4.13 (use positions='all')")
        return mask.to(inps.device)


if __name__ == "__main__":  # python -m countdown.lm_eval_model run --model countdown ... (lm-eval's own CLI)
    from lm_eval.__main__ import cli_evaluate

    import countdown.lm_eval_model  # noqa: F401  registers the importable class (not this __main__ copy)

    cli_evaluate()
else:
    register_model(MODEL_NAME)(CountdownLM)  # lm-eval's registry: model="countdown"
