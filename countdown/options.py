"""The choices that travel with a call or a model instead of living in module globals.

    KernelPolicy   which path serves the sparse modules' decode tokens (Triton kernel or reference) and
                   which kernel variant; stored on every sparse module by ``countdown.sparsify(kernels=)``
                   / ``countdown.set_kernels(model, ...)``.
    DecodeOptions  the decode loop's choices (``torch.compile``, the grouped-query attention path);
                   taken by ``countdown.Decoder(options=)`` and ``countdown.generate(options=)``.

Both are frozen (hashable, comparable): a decoder or a captured CUDA graph is cached under the options
it was built with, so a changed option gives a new one instead of replaying the old graph. For a
temporary change make a new object, ``dataclasses.replace(options, gqa_attention=False)``.

A leaf module: it imports nothing from countdown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

MAX_BATCH = 16  # decode tokens a kernel launch or a Decoder serves (one 16-row MMA tile)

KERNEL_MODES = ("auto", "off", "always")
INPUT_SPARSE_VARIANTS = ("auto", "walk", "prefetch")
ATTENTION_KERNELS = ("auto", "always", "off")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which path and kernel variant serve a sparse module's decode tokens.

    mode: "auto" (Triton kernels for decode tokens on CUDA, the C++ ones of `countdown.kernels.cpu` on a
        CPU where they build, the reference path elsewhere), "off" (the
        reference path only) or "always" (kernels wherever Triton runs them, its CPU interpreter included:
        tests). `kernel_skip_reason` of each module applies it.
    input_sparse: the input-sparse GEMV kernel (TEAL, WINA, attention inputs): "walk"
        (``input_sparse._input_sparse_kernel``), "prefetch" (``input_sparse_prefetch``: the keep mask
        packed into bit words before the weight loop) or "auto": prefetch for one token, walk for 2-16
        (H100, docs/BENCHMARKS.md 2026-11-23: prefetch 1-14% faster at batch 1, 6-15% slower at 2-16).
    fuse_qkv: input-sparse attention layers run q, k and v as one launch (37% faster than three at
        batch 1, 24% at batch 16, H100).
    fuse_gate_up: TEAL/WINA run an FFN's gate and up as one launch of the prefetch kernel at batch 1
        (needs ``input_sparse`` other than "walk").
    compact_max_batch: the batched down projection packs its union rows first (``batch_ffn``'s compact
        kernel) for batches of at most this many tokens; 0: never (H100 A/B: faster at 2-4 tokens).
    pdl: launch the batch-1 kernels with programmatic dependent launch where the GPU (Hopper+) and
        Triton have it (+2% dense to +5.5% TEAL 50% end to end, H100).
    """

    mode: str = "auto"
    input_sparse: str = "auto"
    fuse_qkv: bool = True
    fuse_gate_up: bool = True
    compact_max_batch: int = 4
    pdl: bool = True

    def __post_init__(self) -> None:
        _choice("kernels mode", self.mode, KERNEL_MODES)
        _choice("KernelPolicy.input_sparse", self.input_sparse, INPUT_SPARSE_VARIANTS)
        for name in ("fuse_qkv", "fuse_gate_up", "pdl"):
            _flag(f"KernelPolicy.{name}", getattr(self, name))
        if isinstance(self.compact_max_batch, bool) or not isinstance(self.compact_max_batch, int) \
                or not 0 <= self.compact_max_batch <= MAX_BATCH:
            raise ValueError(f"KernelPolicy.compact_max_batch must be an int from 0 to {MAX_BATCH}, "
                             f"got {self.compact_max_batch!r}")

    @classmethod
    def of(cls, value: "str | KernelPolicy | None") -> "KernelPolicy":
        """A KernelPolicy from a policy, a mode string ("auto", "off", "always") or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value not in KERNEL_MODES:
                raise ValueError(f"kernels must be one of {KERNEL_MODES} or a KernelPolicy, got {value!r}")
            return cls(mode=value)
        raise TypeError(f"kernels must be one of {KERNEL_MODES} or a KernelPolicy, got {value!r}")


DEFAULT_COMPILE_OPTIONS = (("coordinate_descent_tuning", True),)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The choices of `countdown.Decoder` and `countdown.generate`.

    compile: run the model's forward through ``torch.compile`` before the CUDA-graph capture.
    compile_options: Inductor options of that compile, as a mapping or (name, value) pairs (stored as
        sorted pairs). The default turns on coordinate-descent tuning of the small fused kernels (as
        gpt-fast does: ~20 s more compile, 7% faster dense step at batch 1 on the Llama-3-8B shape).
    compile_pdl: with ``compile``, Inductor's kernels also use programmatic dependent launch where this
        torch has the option (Inductor applies it on Hopper+ only).
    gqa_attention: grouped-query models on transformers' sdpa attention decode through
        `countdown.gqa_decode` (the KV cache read as it is, no ``repeat_kv`` copy; H100: +1.5% TEAL 50%,
        +2.4% M-COUNTDOWN 70% + attention 50%, dense unchanged).
    attention_kernel: that packed one-token attention through countdown's Triton kernel
        (`countdown.kernels.decode_attention`) instead of SDPA: "auto" (on CUDA), "always" (also in
        Triton's CPU interpreter: tests) or "off" (H100: 7.2 against 14.9 µs a layer at batch 1).
    cpu_linears: on a CPU model, every plain ``nn.Linear`` of a decode step (attention projections, dense
        MLPs, the LM head) through countdown's C++ GEMV (`countdown.cpu_route`) instead of ``F.linear``;
        False gives torch's own (the dense baseline of issue 26's A/B). With ``compile`` too: the C++ ops
        are registered torch ops (``torch.ops.countdown_cpu``) that the compiled step calls.
    """

    compile: bool = False
    compile_options: tuple = DEFAULT_COMPILE_OPTIONS
    compile_pdl: bool = True
    gqa_attention: bool = True
    attention_kernel: str = "auto"
    cpu_linears: bool = True

    def __post_init__(self) -> None:
        for name in ("compile", "compile_pdl", "gqa_attention", "cpu_linears"):
            _flag(f"DecodeOptions.{name}", getattr(self, name))
        _choice("DecodeOptions.attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        pairs = self.compile_options
        if isinstance(pairs, Mapping):
            pairs = pairs.items()
        try:
            pairs = tuple(sorted((str(k), v) for k, v in pairs))
            hash(pairs)
        except (TypeError, ValueError) as e:
            raise TypeError(f"DecodeOptions.compile_options must map option names to hashable values, "
                            f"got {self.compile_options!r}") from e
        object.__setattr__(self, "compile_options", pairs)
