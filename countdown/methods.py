"""The sparsification methods: which score decides the mask, what is dense, what is skipped.

A gated FFN is ``y = W_down t`` with ``t = act(W_gate x) * (W_up x)``: a linear combination of the
columns of ``W_down`` weighted by the coefficient vector ``t``. A method is one class here, and the
class is everything there is to know about it:

* ``scores``: the score it masks on, one tensor per *site* (each site gets its own threshold);
* ``forward``: the pure-PyTorch reference. It computes the skipped products too and zeroes them, which
  is numerically what a kernel that never reads the skipped weights produces;
* ``ffn_bytes_read``: which products are dense and which are skipped, as a fraction of FFN bytes;
* ``kernel_forward`` (``has_kernel``): the Triton op that serves a decode step (1 to 16 tokens, each
  with its own mask), if any.
* ``stats`` / ``calibration_stats``: per-neuron constants measured once on calibration text (CHESS's
  E|up_i|), given back to the sparse module as buffers (``parts.stat(name)``) and saved in the artifact;
* ``gated_only``: the method needs W_gate, W_up and W_down (a plain FFN gets a clear error up front).

``keep(site, score)`` is supplied by the caller (`countdown.ffn`): it turns a score into a 0/1 mask by
per-token top-k or by a calibrated threshold. Scores and masks are ``[..., I]`` (one row per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch


Keep = Callable[[str, torch.Tensor], torch.Tensor]


def check_sparsity(sparsity: float) -> float:
    """``sparsity`` as a float in [0, 1), or a clear error."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (fraction of FFN neurons skipped per token), got {sparsity}")
    return float(sparsity)


def keep_count(width: int, sparsity: float, rule: str = "floor") -> int:
    """Neurons kept per token out of ``width`` at ``sparsity`` in top-k mode (the one counting rule).

    ``rule="floor"`` drops ``int(width * sparsity)`` neurons, as the official COUNTDOWN code does
    (``num_to_zero = int(dim * ratio)``, in that operand order, float artefacts included);
    ``"round"`` drops ``round(width * sparsity)``. They differ by one neuron when the fractional part
    is >= 0.5 (e.g. 0.8 x 14336 = 11468.8). The official ``max(1, .)`` (one neuron dropped even at
    sparsity 0) is not reproduced: sparsity 0 is the dense model here."""
    if rule == "floor":
        return width - int(width * sparsity)
    if rule == "round":
        return width - int(round(sparsity * width))
    raise ValueError(f"count rule must be 'floor' or 'round', got {rule!r}")


class FFNParts(Protocol):
    """The pieces of one FFN, provided by `countdown.ffn` for either layout ([..., H] in, [..., I] out)."""

    kind: str  # "gated" | "plain"

    def act(self, h: torch.Tensor) -> torch.Tensor: ...
    def gate(self, x: torch.Tensor) -> torch.Tensor: ...  # W_gate x (pre-activation); plain: W_in x
    def up(self, x: torch.Tensor) -> torch.Tensor: ...  # W_up x; plain FFNs have none
    def down(self, t: torch.Tensor) -> torch.Tensor: ...  # W_down t; plain: W_out t
    def predict(self, x: torch.Tensor) -> torch.Tensor: ...  # predictor's estimate of |t|
    def ffn_input(self, x: torch.Tensor) -> torch.Tensor: ...  # the FFN's input (plain: W_in's input)
    def mask_input(self, x: torch.Tensor, keep: Keep) -> torch.Tensor: ...  # x with input site "input" masked
    # for kernels (gated FFNs only): [I, H] row-major views, one row per neuron
    kernel_act: str | None

    def gate_weight(self) -> torch.Tensor: ...
    def up_weight(self) -> torch.Tensor: ...
    def down_t(self) -> torch.Tensor: ...
    def input_major(self) -> list[torch.Tensor]: ...  # [H, I] gate/up (or one [H, 2I] fused gate_up)
    def threshold(self, site: str) -> torch.Tensor: ...
    # the ops serving decode tokens x: `countdown.kernels` (Triton) or `countdown.kernels.cpu` (C++)
    def kernel_ops(self, x: torch.Tensor): ...

    # weight-derived constants (gated FFNs; cached by the module until the weights change) and
    # calibration statistics
    def column_norms(self, which: str) -> torch.Tensor: ...  # ‖W[:, j]‖₂ per input channel j, float32
    def low_rank(self, which: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # W_r = (A B)ᵀ
    def stat(self, name: str) -> torch.Tensor: ...  # [I] float32, measured on calibration text


def check_ffn_kind(method: "Method", kinds: set[str]) -> None:
    """A clear error when ``method`` cannot run on FFNs of these kinds ("gated" / "plain")."""
    if method.gated_only and kinds - {"gated"}:
        raise ValueError(
            f"method {method.name!r} needs a gated FFN (W_down (act(W_gate x) * W_up x): Llama, Mistral, Qwen, "
            f"Gemma, Phi-3); this model's FFN is plain (W_out act(W_in x)). Methods that run on plain FFNs: "
            f"{', '.join(name for name, m in METHODS.items() if not m.gated_only)}"
        )


def coefficient(parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
    """The direct coefficient t: act(W_gate x) * (W_up x), or act(W_in x) for a plain FFN."""
    a = parts.act(parts.gate(x))
    return a * parts.up(x) if parts.kind == "gated" else a


def per_neuron_threshold(parts: FFNParts, key: str, sources: tuple[torch.Tensor, ...],
                         compute: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``compute(*sources)``: a kernel's per-neuron threshold vector [I] (fp32, contiguous) derived from a
    site's threshold and per-neuron constants, cached on the module under ``key`` until a source changes.

    A source changes when it is replaced (``.to()``, a new buffer or weight: new storage) or updated in
    place (its version counter). The cache holds the sources it was computed from, so their storage
    cannot be reused by a new tensor while the entry stands. Inside a torch.compile trace the cached
    vector is used as it is (no Python-side checks in the graph); inside a CUDA-graph capture a missing
    vector is computed in the graph and not cached (its memory belongs to the graph). Warm-up runs
    eagerly before capture (`countdown.decode`), which fills the cache."""
    cache = getattr(parts, "_kernel_thresholds", None)
    hit = cache.get(key) if cache is not None else None
    if torch.compiler.is_compiling():
        return hit[2] if hit is not None else compute(*sources)
    stamp = tuple((t.device, t.data_ptr(), t._version) for t in sources)
    if hit is not None and hit[0] == stamp:
        return hit[2]
    with torch.no_grad():
        value = compute(*sources).float().contiguous()
    if not any(t.is_cuda for t in sources) or not torch.cuda.is_current_stream_capturing():
        if cache is None:
            cache = {}
            setattr(parts, "_kernel_thresholds", cache)
        cache[key] = (stamp, sources, value)
    return value


def _rescaled_threshold(tau: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """thr_i with ``s > thr_i`` ⇔ ``s·scale_i > τ`` for every s ≥ 0: τ / scale_i; where scale_i = 0 the
    product is 0, kept iff 0 > τ (thr = -inf: always; +inf: never). float64, then fp32."""
    tau, scale = tau.double().reshape(()), scale.double()
    never_or_always = torch.where(tau < 0, -math.inf, math.inf)
    return torch.where(scale > 0, tau / scale, never_or_always).float()


def _saliency_threshold(tau: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """thr_i with ``|t| > thr_i`` ⇔ ``½ t² n_i² > τ`` (S-COUNTDOWN): sqrt(2τ) / n_i for τ ≥ 0 (never where
    n_i = 0: the saliency is 0); τ < 0 keeps every neuron (a saliency is never negative)."""
    tau, norm = tau.double().reshape(()), norm.double()
    thr = torch.where(norm > 0, torch.sqrt(2 * tau.clamp_min(0)) / norm, math.inf)
    return torch.where(tau < 0, -math.inf, thr).float()


def _two_of_three(kind: str, skipped: float) -> float:
    """Bytes read when one projection is dense and the other two are read for kept neurons only."""
    return (1 + 2 * (1 - skipped)) / 3 if kind == "gated" else (1 + (1 - skipped)) / 2


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    sites: tuple[str, ...] = ("coef",)
    needs_predictor: bool = False
    has_kernel: ClassVar[bool] = False
    # projections the kernel reads input-major (W transposed: a skipped *input* channel is one contiguous
    # row); the rest stay nn.Linear's [out, in] rows. Either way the model keeps one copy of each weight.
    kernel_layout: ClassVar[tuple[str, ...]] = ("down",)
    gated_only: ClassVar[bool] = False
    # names of per-neuron statistics measured on calibration text before scoring (see calibration_stats)
    stats: ClassVar[tuple[str, ...]] = ()

    @property
    def reported_site(self) -> str:
        """The site whose measured skipped fraction is reported as the method's sparsity: the
        coefficient (down input) where the method masks it, else its first site."""
        return "coef" if "coef" in self.sites or not self.sites else self.sites[0]

    def calibration_stats(self, parts: FFNParts, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token values [..., I] whose mean over the calibration tokens is each statistic in ``stats``."""
        return {}

    def scores(self, parts: FFNParts, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Score per site on the dense model, used to calibrate thresholds."""
        raise NotImplementedError

    def forward(self, parts: FFNParts, x: torch.Tensor, keep: Keep) -> torch.Tensor:
        raise NotImplementedError

    def ffn_bytes_read(self, kind: str, skipped: dict[str, float]) -> float:
        """Fraction of the FFN's weight bytes a kernel must read, given the skipped fraction per site."""
        raise NotImplementedError

    def kernel_forward(self, parts: FFNParts, x: torch.Tensor) -> torch.Tensor:
        """The FFN output for decode tokens x through this method's kernel op (``has_kernel`` only), from
        ``parts.kernel_ops(x)``: the Triton ops on CUDA, the C++ ones (`countdown.kernels.cpu`) on a CPU;
        ``parts.threshold(site)`` is a site's 1-element threshold on x's device. A score that rescales
        another per neuron becomes a per-neuron threshold vector (`per_neuron_threshold`)."""
        raise NotImplementedError(f"method {self.name!r} has no kernel")


class Dense(Method):
    def scores(self, parts, x):
        return {}

    def forward(self, parts, x, keep):
        return parts.down(coefficient(parts, x))

    def ffn_bytes_read(self, kind, skipped):
        return 1.0


class Cats(Method):
    """CATS: threshold |act(W_gate x)|; gate dense, up rows and down columns of kept neurons."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": parts.act(parts.gate(x)).abs()}

    def forward(self, parts, x, keep):
        a = parts.act(parts.gate(x))
        a = a * keep("coef", a.abs())
        return parts.down(a * parts.up(x) if parts.kind == "gated" else a)

    def ffn_bytes_read(self, kind, skipped):
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x):
        threshold = parts.threshold("coef")
        return parts.kernel_ops(x).fused_gather_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), threshold,
                                        act=parts.kernel_act, dense="gate", policy=parts.kernels)


class MCountdown(Method):
    """M-COUNTDOWN: threshold the indirect coefficient |W_up x|; up dense, gate rows and down columns
    of kept neurons. For a plain FFN there is no separate linear factor, so the indirect coefficient
    is W_in x itself (the pre-activation) and only W_out is sparse."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": self._indirect(parts, x).abs()}

    @staticmethod
    def _indirect(parts, x):
        return parts.up(x) if parts.kind == "gated" else parts.gate(x)

    def forward(self, parts, x, keep):
        u = self._indirect(parts, x)
        u = u * keep("coef", u.abs())
        if parts.kind == "gated":
            return parts.down(parts.act(parts.gate(x)) * u)
        return parts.down(parts.act(u))

    def ffn_bytes_read(self, kind, skipped):
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x):
        threshold = parts.threshold("coef")
        # the op's dense projection is W_up here, its sparse one W_gate
        return parts.kernel_ops(x).fused_gather_ffn(x, parts.up_weight(), parts.gate_weight(), parts.down_t(), threshold,
                                        act=parts.kernel_act, dense="up", policy=parts.kernels)


class DCountdownIdeal(Method):
    """D-COUNTDOWN (ideal): threshold the direct coefficient |t| itself; gate and up dense (an oracle),
    only the down columns of kept neurons are read."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": coefficient(parts, x).abs()}

    def forward(self, parts, x, keep):
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", t.abs()))

    def ffn_bytes_read(self, kind, skipped):
        s = skipped["coef"]
        return (2 + (1 - s)) / 3 if kind == "gated" else (1 + (1 - s)) / 2

    def kernel_forward(self, parts, x):
        threshold = parts.threshold("coef")
        return parts.kernel_ops(x).coefficient_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), threshold,
                                       act=parts.kernel_act, policy=parts.kernels)


class DCountdown(Method):
    """D-COUNTDOWN (practical): a low-rank predictor estimates |t| from x; gate, up and down are all
    read only for the predicted neurons. The predictor's own bytes are counted by `countdown.predictor`."""

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": parts.predict(x)}

    def forward(self, parts, x, keep):
        mask = keep("coef", parts.predict(x))
        return parts.down(coefficient(parts, x) * mask)

    def ffn_bytes_read(self, kind, skipped):
        return 1 - skipped["coef"]

    def kernel_forward(self, parts, x):
        threshold = parts.threshold("coef")
        return parts.kernel_ops(x).predicted_sparse_ffn(x, parts.predict(x), parts.gate_weight(), parts.up_weight(),
                                            parts.down_t(), threshold, act=parts.kernel_act, policy=parts.kernels)


class Teal(Method):
    """TEAL-style: threshold the magnitude of each matrix's *input*: |x| for gate/up (or W_in) columns,
    |t| for down (or W_out) columns. Sparsity applies to both sites. Its kernel is the input-sparse
    GEMV, which wants every matrix input-major."""

    has_kernel = True
    kernel_layout = ("gate", "up", "down")

    def scores(self, parts, x):
        return {"input": parts.ffn_input(x).abs(), "coef": coefficient(parts, x).abs()}

    def forward(self, parts, x, keep):
        x = parts.mask_input(x, keep)
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", t.abs()))

    def ffn_bytes_read(self, kind, skipped):
        s_in, s_coef = skipped["input"], skipped["coef"]
        return (2 * (1 - s_in) + (1 - s_coef)) / 3 if kind == "gated" else ((1 - s_in) + (1 - s_coef)) / 2

    def kernel_forward(self, parts, x):
        # input-sparse GEMVs: gate and up read the rows of the kept input channels, down those of kept t
        projections = parts.kernel_ops(x).input_sparse_linears(x, parts.input_major(), parts.threshold("input"), policy=parts.kernels)
        g, u = projections if len(projections) == 2 else projections[0].chunk(2, dim=-1)
        t = parts.act(g) * u
        return parts.kernel_ops(x).input_sparse_linear(t, parts.down_t(), parts.threshold("coef"), policy=parts.kernels)


class DejaVu(Method):
    """DejaVu, as the COUNTDOWN paper's baseline: keep the neurons with the largest *signed* gate
    pre-activation g = W_gate x (plain FFN: W_in x); gate dense, up rows and down columns of kept neurons.

    The official COUNTDOWN code (``rustic-snob/COUNTDOWN``, ``countdown/sparsify.py``, method ``dejavu``,
    state ``ideal``) takes a per-token k-th value of g itself (no absolute value), zeroes g below it and
    then applies the activation: ``up(x) * act(where(g > kth, g, 0))``. This class does the same (top-k of
    g, or a calibrated threshold on g); act(0) = 0 for every supported activation, so a skipped neuron
    has t_i = 0. The original DejaVu predicts these neurons with a trained lookahead MLP; that is the
    paper's "practical" DejaVu and is not this class. Works on plain FFNs too (DejaVu's own setting is
    ReLU OPT). Kernel: the CATS gather op (`kernels.fused_gather_ffn`, dense="gate") with the signed
    score, ``signed=True, score_act=False``: keep ``g_i > τ`` instead of ``|act(g_i)| > τ``; no extra bytes
    (gated FFNs; a plain FFN's activation module has no kernel).
    """

    has_kernel = True

    def scores(self, parts, x):
        return {"coef": parts.gate(x)}

    def forward(self, parts, x, keep):
        g = parts.gate(x)
        a = parts.act(g * keep("coef", g))
        return parts.down(a * parts.up(x) if parts.kind == "gated" else a)

    def ffn_bytes_read(self, kind, skipped):
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x):
        return parts.kernel_ops(x).fused_gather_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(),
                                        parts.threshold("coef"), act=parts.kernel_act, dense="gate",
                                        score_act=False, signed=True, policy=parts.kernels)


class SCountdown(Method):
    """S-COUNTDOWN (the official code's saliency variant): mask on the OBD-style saliency
    ½·t_i²·‖W_down[:, i]‖², the first-order loss of the FFN output from dropping t_i; gate and up dense,
    only the down columns of kept neurons are read (bytes as D-COUNTDOWN ideal).

    Official code (``calculate_saliency`` and method ``s-countdown``, state ``ideal``): the squared column
    norms of ``down_proj.weight`` are computed once per layer, the per-token k-th value is taken on the
    saliency, and t is zeroed where the saliency is not above it. Here the column norms come from
    ``parts.column_norms("down")`` (cached per module) and the saliency is computed in float32 (t² of an
    fp16 outlier would overflow). The official "practical" state uses a trained predictor, which is not
    this class. Gated FFNs only. Kernel: ``½ t_i² n_i² > τ`` is ``|t_i| > √(2τ) / n_i``, so the coefficient
    op (`kernels.coefficient_ffn`, as D-COUNTDOWN ideal) with that per-neuron threshold vector (I fp32
    values, computed once per threshold and weight; n_i = 0 never keeps, τ < 0 keeps all).
    """

    gated_only = True
    has_kernel = True

    def scores(self, parts, x):
        return {"coef": self._saliency(parts, coefficient(parts, x))}

    @staticmethod
    def _saliency(parts, t):
        return 0.5 * t.float().square() * parts.column_norms("down").square()

    def forward(self, parts, x, keep):
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", self._saliency(parts, t)).to(t.dtype))

    def ffn_bytes_read(self, kind, skipped):
        return (2 + (1 - skipped["coef"])) / 3

    def kernel_forward(self, parts, x):
        thr = per_neuron_threshold(parts, "s-countdown:coef", (parts.threshold("coef"), parts.column_norms("down")),
                                   _saliency_threshold)
        return parts.kernel_ops(x).coefficient_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), thr,
                                       act=parts.kernel_act, policy=parts.kernels)


class Dhar(Method):
    """Dhar et al. (IPCCC 2024): zero every entry with |v| below a per-layer magnitude threshold on three
    tensors of a gated FFN, each its own site: the gate *pre-activation* W_gate x ("gate"), the up output
    W_up x ("up") and the FFN output y = W_down t ("output", width H).

    Official code (``nobeldhar/llm-activation-sparsity``, ``awq/entry_new.py`` ``ThresholdLlamaMLP``):
    ``where(|v| >= τ, v, 0)`` on ``gate_proj(x)`` (before act_fn), ``up_proj(x)`` and ``down_proj(...)``; τ
    per layer and tensor is the pooled s-percentile of |v| (``threshold_determination.py``). Differences:
    the mask keeps |v| > τ (ties are measure-zero); the official thresholds all come from the dense
    model, while here later sites are calibrated with the earlier ones masked (the library's rule for
    multi-site methods, `countdown.calibrate.sequential_thresholds`), so each site reaches its target on
    the sparse model.

    Bytes: gate and up must be computed in full to be thresholded; a kernel can skip the down columns
    of neurons whose gate *or* up entry was zeroed (t_i = 0); masking the output saves nothing. Only
    per-site fractions are measured, so the skipped down fraction is estimated as if the two masks were
    independent: 1 − (1 − s_gate)(1 − s_up). The reported sparsity is the gate site's. Gated FFNs only
    (a plain FFN's output is produced by the model's W_out, outside the replaced activation).
    No kernel: the coefficient op (`kernels.coefficient_ffn`) with |g| and |u| thresholds would serve it.
    """

    gated_only = True

    def scores(self, parts, x):
        g, u = parts.gate(x), parts.up(x)
        return {"gate": g.abs(), "up": u.abs(), "output": parts.down(parts.act(g) * u).abs()}

    def forward(self, parts, x, keep):
        g = parts.gate(x)
        g = g * keep("gate", g.abs())
        u = parts.up(x)
        u = u * keep("up", u.abs())
        y = parts.down(parts.act(g) * u)
        return y * keep("output", y.abs())

    def ffn_bytes_read(self, kind, skipped):
        down_skipped = 1 - (1 - skipped["gate"]) * (1 - skipped["up"])
        return (2 + (1 - down_skipped)) / 3


class Chess(Method):
    """CHESS (FFN part): channel-wise importance |act(W_gate x)_i|·E|u_i|, where E|u_i| is the mean |W_up x|
    of neuron i on calibration text; gate dense, up rows and down columns of kept neurons (bytes as CATS).

    Official code (``junhuihe-hjh/CHESS``, ``CHESS/notebooks/thresholds.py``): a first pass over C4
    accumulates ``up_proj_states_abs_mean`` per layer, a second takes the s-quantile of the importance
    scores; at run time ``|act(gate)| < τ / E|u_i|`` is zeroed, i.e. importance below τ. Here E|u_i| is
    the statistic ``"up_abs_mean"``, the mean over all calibration tokens (the official code averages
    per-document means), measured by a pass before the score pass and given back to the module as a
    buffer; the artifact saves it. It is needed in top-k mode too, so CHESS always needs calibration
    text. Gated FFNs only (a plain FFN has no up projection; the score would be CATS's).
    Kernel: the CATS gather op (`kernels.fused_gather_ffn`, dense="gate", |act(g)|) with the per-neuron
    threshold vector τ / E|u_i| (I fp32 values, computed once per threshold and statistic; E|u_i| = 0
    never keeps, as its importance is 0, unless τ < 0).
    """

    gated_only = True
    has_kernel = True
    stats = ("up_abs_mean",)

    def calibration_stats(self, parts, x):
        return {"up_abs_mean": parts.up(x).abs()}

    def _importance(self, parts, a):
        return a.abs() * parts.stat("up_abs_mean").to(a.dtype)

    def scores(self, parts, x):
        return {"coef": self._importance(parts, parts.act(parts.gate(x)))}

    def forward(self, parts, x, keep):
        a = parts.act(parts.gate(x))
        a = a * keep("coef", self._importance(parts, a))
        return parts.down(a * parts.up(x))

    def ffn_bytes_read(self, kind, skipped):
        return _two_of_three(kind, skipped["coef"])

    def kernel_forward(self, parts, x):
        thr = per_neuron_threshold(parts, "chess:coef", (parts.threshold("coef"), parts.stat("up_abs_mean")),
                                   _rescaled_threshold)
        return parts.kernel_ops(x).fused_gather_ffn(x, parts.gate_weight(), parts.up_weight(), parts.down_t(), thr,
                                        act=parts.kernel_act, dense="gate", score_act=True, policy=parts.kernels)


class Wina(Method):
    """WINA: weight-informed input sparsity. At each matrix's input, neuron (channel) j scores
    |x_j|·‖W[:, j]‖₂, the column norm of the weight that consumes it. Two sites as TEAL: "input" (x, shared
    by W_gate and W_up, scored with W_gate's column norms) and "coef" (t, scored with W_down's).

    The paper scores every linear layer with its own column norms. The official code
    (``microsoft/wina``, ``wina/mlp.py``) sets the up and down norms to 1 for Llama/Qwen (up gets its own
    mask on plain |x|, down is scored by |t| alone, i.e. TEAL's) and uses the fused gate_up column norms
    for Phi. This class follows the paper's formula at the down input and uses one input mask with the
    W_gate norms for both W_gate and W_up (also for Phi-3's fused layout). Scores are in the activation's
    dtype, as the official code computes them. Gated FFNs only. Kernel (WINA ships none): TEAL's
    input-sparse GEMV (`kernels.input_sparse_linear`) with its ``channel_scale``, score |x_j|·scale_j >
    τ: the column norms of W_gate for gate and up, of W_down for down (K fp32 values per matrix,
    cached per module until the weights change); every matrix input-major, as for TEAL.
    """

    gated_only = True
    has_kernel = True
    kernel_layout = ("gate", "up", "down")

    def scores(self, parts, x):
        t = coefficient(parts, x)
        return {"input": self._input_score(parts, x), "coef": self._coef_score(parts, t)}

    @staticmethod
    def _input_score(parts, x):
        return x.abs() * parts.column_norms("gate").to(x.dtype)

    @staticmethod
    def _coef_score(parts, t):
        return t.abs() * parts.column_norms("down").to(t.dtype)

    def forward(self, parts, x, keep):
        x = x * keep("input", self._input_score(parts, x))
        t = coefficient(parts, x)
        return parts.down(t * keep("coef", self._coef_score(parts, t)))

    def ffn_bytes_read(self, kind, skipped):
        return Teal.ffn_bytes_read(self, kind, skipped)

    def kernel_forward(self, parts, x):
        thr_in, norms_in = parts.threshold("input"), parts.column_norms("gate")
        projections = parts.kernel_ops(x).input_sparse_linears(x, parts.input_major(), thr_in, channel_scale=norms_in,
                                                     policy=parts.kernels)
        g, u = projections if len(projections) == 2 else projections[0].chunk(2, dim=-1)
        t = parts.act(g) * u
        return parts.kernel_ops(x).input_sparse_linear(t, parts.down_t(), parts.threshold("coef"),
                                           channel_scale=parts.column_norms("down"), policy=parts.kernels)


@dataclass(frozen=True)
class RSparse(Method):
    """R-Sparse (ICLR 2025): input-channel sparsity of each FFN matrix plus a rank-r SVD approximation of
    the skipped part, ``W x ≈ W (m ⊙ x) + U_r S_r V_rᵀ ((1 − m) ⊙ x)``. Sites: "gate_input" and
    "up_input" (both on x, each with its own matrix's column norms) and "coef" (t, W_down's norms).

    Official code (``VITA-Group/R-Sparse``, ``models/modeling_llama.py`` ``R_Sparse_Linear``, mode
    ``r_sparse``): the mask keeps |x_j·scale_j| > τ, ``scale`` being the row norms of V·S, i.e. the column
    norms of W; τ is the s-quantile of that score on one calibration batch, per linear layer; the low-rank
    factors come from the SVD of each weight (``utils/prepare_low_rank_weight.py``). Its budget rule
    (``utils/setup.py``) spends a fraction (1 − s)(1 − α) of each matrix's bytes on the factors,
    rank = in·out·(1 − s)(1 − α)/(in + out), with α ("sparse_ratio") found per matrix by an evolutionary
    search. Here ``low_rank_budget`` is that fraction, fixed per method: rank = ⌊β·in·out/(in + out)⌋.
    The default β = 0.05 is (1 − s)(1 − α) at the paper's headline 50% with α = 0.9 (the shipped Llama-3-8B
    search mostly keeps α = 1 in the FFN, i.e. no low-rank part; below 0.9 only in a few layers);
    peers.md §5 describes the method. Other differences: thresholds of later sites are calibrated with
    the earlier sites masked (library rule for multi-site methods; the official ones are all taken on
    the dense model), and R-Sparse also sparsifies attention projections, which is outside the FFN.

    Bytes: per matrix the kept input columns plus the factors, (1 − s_site) + β (β bounds the factor
    bytes: the rank is rounded down). Gated FFNs only. Reference path only (the official README marks its
    Triton kernel unfinished).
    """

    low_rank_budget: float = 0.05
    gated_only: ClassVar[bool] = True
    _matrices: ClassVar[tuple[tuple[str, str], ...]] = (("gate", "gate_input"), ("up", "up_input"), ("down", "coef"))

    def rank(self, in_features: int, out_features: int) -> int:
        """The SVD rank kept for an ``out_features × in_features`` matrix."""
        return int(self.low_rank_budget * in_features * out_features / (in_features + out_features))

    @staticmethod
    def _score(parts, which, v):
        return v.abs() * parts.column_norms(which).to(v.dtype)

    def scores(self, parts, x):
        t = coefficient(parts, x)
        return {"gate_input": self._score(parts, "gate", x), "up_input": self._score(parts, "up", x),
                "coef": self._score(parts, "down", t)}

    def _linear(self, parts, which, site, v, keep):
        m = keep(site, self._score(parts, which, v))
        apply = {"gate": parts.gate, "up": parts.up, "down": parts.down}[which]
        out = apply(v * m)
        in_features = v.shape[-1]
        rank = self.rank(in_features, out.shape[-1])
        if rank == 0:
            return out
        a, b = parts.low_rank(which, rank)
        return out + ((v * (1 - m)) @ a) @ b

    def forward(self, parts, x, keep):
        g = self._linear(parts, "gate", "gate_input", x, keep)
        u = self._linear(parts, "up", "up_input", x, keep)
        return self._linear(parts, "down", "coef", parts.act(g) * u, keep)

    def ffn_bytes_read(self, kind, skipped):
        return sum(1 - skipped[site] + self.low_rank_budget for _, site in self._matrices) / 3


class CollectScores(Method):
    """Calibration only: run the FFN densely and record the scores of several methods at once, at
    sites named ``"<method>:<site>"``, so one pass over calibration text serves them all."""

    def __init__(self, methods: list[Method]):
        object.__setattr__(self, "methods", tuple(methods))
        sites = tuple(f"{m.name}:{site}" for m in methods for site in m.sites)
        super().__init__("collect", "calibration pass", sites, any(m.needs_predictor for m in methods))

    def forward(self, parts, x, keep):
        for m in self.methods:
            for site, score in m.scores(parts, x).items():
                keep(f"{m.name}:{site}", score)
        return parts.down(coefficient(parts, x))


class CollectStats(Method):
    """Calibration only: run the FFN densely and show every per-neuron statistic the methods need
    (``calibration_stats``) to the mask rule, at sites named by the statistic, once per name."""

    def __init__(self, methods: list[Method]):
        object.__setattr__(self, "methods", tuple(methods))
        names = tuple(dict.fromkeys(name for m in methods for name in m.stats))
        super().__init__("collect-stats", "calibration pass (per-neuron statistics)", names)

    def forward(self, parts, x, keep):
        shown = set()
        for m in self.methods:
            for name, value in m.calibration_stats(parts, x).items():
                if name not in shown:
                    keep(name, value)
                    shown.add(name)
        return parts.down(coefficient(parts, x))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Dense("dense", "no sparsity (baseline)", sites=()),
        Cats("cats", "CATS: mask on |act(gate x)|; gate dense, up+down sparse"),
        Teal("teal", "TEAL-style: mask on |input| of every FFN matrix", sites=("input", "coef")),
        MCountdown("m-countdown", "M-COUNTDOWN: mask on indirect coefficient |up x|; up dense, gate+down sparse"),
        DCountdownIdeal("d-countdown-ideal", "D-COUNTDOWN oracle: mask on |t|; gate+up dense, down sparse"),
        DCountdown("d-countdown", "D-COUNTDOWN practical: predictor of |t|; gate, up, down sparse", needs_predictor=True),
        DejaVu("dejavu", "DejaVu (paper's baseline, ideal): mask on signed gate x; gate dense, up+down sparse"),
        SCountdown("s-countdown", "S-COUNTDOWN: mask on saliency t²·‖W_down[:,i]‖²/2; gate+up dense, down sparse"),
        Dhar("dhar", "Dhar et al.: |v| thresholds on gate x, up x and the FFN output; down sparse",
             sites=("gate", "up", "output")),
        Chess("chess", "CHESS: mask on |act(gate x)|·E|up| (calibrated per neuron); gate dense, up+down sparse"),
        Wina("wina", "WINA: mask on |input|·column norm of its matrix at every FFN matrix",
             sites=("input", "coef")),
        RSparse("r-sparse", "R-Sparse: input sparsity of each matrix plus a low-rank remainder",
                sites=("gate_input", "up_input", "coef")),
    )
}
SPARSE_METHODS: tuple[str, ...] = tuple(name for name in METHODS if name != "dense")
KERNEL_METHODS: tuple[str, ...] = tuple(name for name, m in METHODS.items() if m.has_kernel)


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names get an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
