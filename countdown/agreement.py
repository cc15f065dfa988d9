"""Generation quality beyond perplexity: how long a sparse model's greedy text stays the dense model's.

Perplexity scores each next token given the true text; generation feeds a model its own tokens, so
errors compound. For each held-out prompt this generates ``max_new_tokens`` greedy tokens with the
sparse model (optionally with Sirius correction, `countdown.correction`) and with the dense model
through the same decode loop, and reports:

* ``first_divergence``: new tokens equal to the dense model's before the first that is not
  (``max_new_tokens`` when none differs);
* ``fraction_equal``: the fraction of the ``max_new_tokens`` positions where the two agree;
* ``drift_ppl``: the dense model's perplexity of the sparse continuation given the prompt (GLASS-style
  drift: how plausible the dense model finds what the sparse one wrote), beside ``dense_ppl``, the
  dense model's perplexity of its own greedy continuation (the floor).

The dense model is the sparse model itself with every sparse module dense for the block (`dense`):
its FFNs and attention projections then run the dense path of the same weights, the path prefill
takes, so no second copy of the model is needed. That needs ``positions="decode"`` (the default).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, ffn
from .correction import Acceptance, resolve
from .generation import decoder_for

ALL_DENSE = 1 << 40  # a sparse_from no forward reaches: every position dense


@contextmanager
def dense(model: nn.Module) -> Iterator[nn.Module]:
    """The model with every sparse FFN and attention projection dense inside the block."""
    modules = [*ffn.sparse_modules(model), *attention.sparse_projections(model)]
    spec = ffn.sparsity_spec(model)
    if spec is not None and spec.positions == "all":
        raise ValueError("the dense reference runs the sparse model's modules densely, which positions='all' "
                         "forbids; sparsify with positions='decode' (the default)")
    saved = [m.sparse_from for m in modules]
    for m in modules:
        m.sparse_from = ALL_DENSE
    try:
        yield model
    finally:
        for m, value in zip(modules, saved):
            m.sparse_from = value


@dataclass
class AgreementResult:
    new_tokens: int
    first_divergence: list[int]  # per prompt
    fraction_equal: list[float]  # per prompt
    drift_ppl: float  # dense ppl of the sparse continuations (all prompts' tokens pooled)
    dense_ppl: float  # dense ppl of its own greedy continuations
    tokens: torch.Tensor  # [n, max_new_tokens] the sparse (or corrected) continuations
    dense_tokens: torch.Tensor  # [n, max_new_tokens] the dense greedy continuations
    tokens_per_second: list[float] = field(default_factory=list)  # per prompt, the decode loop
    dense_forwards: int = 0  # correction: dense checks after prefill, all prompts
    accepted: int = 0
    drafted: int = 0

    @property
    def mean_first_divergence(self) -> float:
        return statistics.fmean(self.first_divergence)

    @property
    def mean_fraction_equal(self) -> float:
        return statistics.fmean(self.fraction_equal)

    @property
    def tokens_per_dense_forward(self) -> float:
        return (self.accepted + self.dense_forwards) / self.dense_forwards if self.dense_forwards else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def _continuations(model: nn.Module, prompts: torch.Tensor, n: int, correct_every: int | None = None,
                   accept: str | Acceptance = "strict") -> tuple[torch.Tensor, list, list]:
    """Greedy continuations [n_prompts, n] through the decoder `countdown.generate` uses (no EOS stop),
    each prompt alone, with each run's decode speed and correction statistics."""
    correction = resolve(correct_every, accept, do_sample=False)
    spare = correction.every if correction is not None else 0
    device = next(model.parameters()).device
    rows, speeds, stats = [], [], []
    for prompt in prompts:
        decoder = decoder_for(model, 1, prompt.numel() + n + spare)
        result = decoder.generate(prompt.view(1, -1).to(device), n, correct_every=correct_every, accept=accept)
        if result.new_tokens != n:
            raise RuntimeError(f"asked for {n} tokens, got {result.new_tokens}")
        rows.append(result.tokens[0, prompt.numel():])
        speeds.append(result.tokens_per_second)
        stats.append(result.correction)
    return torch.stack(rows), speeds, stats


@torch.no_grad()
def _dense_nll(model: nn.Module, prompts: torch.Tensor, continuations: torch.Tensor) -> tuple[float, int]:
    """Summed dense negative log-likelihood of the continuations given their prompts, and the count."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with dense(model):
        for prompt, cont in zip(prompts, continuations):
            ids = torch.cat([prompt, cont]).view(1, -1).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, prompt.numel() - 1 : -1].float()
            total += float(F.cross_entropy(logits, cont.to(device), reduction="sum"))
            count += cont.numel()
    return total, count


def generation_agreement(
    model: nn.Module,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int = 256,
    correct_every: int | None = None,
    accept: str | Acceptance = "strict",
    dense_tokens: torch.Tensor | None = None,
) -> AgreementResult:
    """Greedy agreement of the (sparse) ``model`` with its dense self on ``prompts`` ([n, P] token ids,
    one generation each; `countdown.data.first_tokens` of held-out text), and the drift perplexity.

    ``correct_every`` / ``accept``: Sirius correction of the sparse generation (`countdown.generate`).
    ``dense_tokens`` ([n, max_new_tokens]): the dense continuations of an earlier result, to skip
    generating them again when comparing several configurations of one model on the same prompts."""
    if not isinstance(prompts, torch.Tensor) or prompts.dtype != torch.long or prompts.dim() != 2:
        raise ValueError("prompts must be a [n, P] torch.long tensor of token ids (one prompt per row)")
    if prompts.shape[0] < 1 or prompts.shape[1] < 1:
        raise ValueError(f"prompts has shape {tuple(prompts.shape)}: need at least one non-empty prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if dense_tokens is None:
        with dense(model):
            dense_tokens, _, _ = _continuations(model, prompts, max_new_tokens)
    elif tuple(dense_tokens.shape) != (prompts.shape[0], max_new_tokens):
        raise ValueError(f"dense_tokens has shape {tuple(dense_tokens.shape)}; these prompts and max_new_tokens "
                         f"need {(prompts.shape[0], max_new_tokens)}")
    tokens, speeds, stats = _continuations(model, prompts, max_new_tokens, correct_every=correct_every, accept=accept)
    equal = tokens == dense_tokens.to(tokens.device)
    differs = ~equal
    first = [int(row.long().argmax()) if bool(row.any()) else max_new_tokens for row in differs]
    nll, count = _dense_nll(model, prompts, tokens)
    dense_nll, dense_count = _dense_nll(model, prompts, dense_tokens)
    result = AgreementResult(max_new_tokens, first, equal.float().mean(dim=1).tolist(), math.exp(nll / count),
                             math.exp(dense_nll / dense_count), tokens, dense_tokens, speeds)
    for s in stats:
        if s is not None:
            result.dense_forwards += s.rounds
            result.accepted += s.accepted
            result.drafted += s.drafted
    return result
