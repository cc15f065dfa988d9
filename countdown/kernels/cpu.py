"""CPU decode kernels: a C++ extension (``cpu_kernels.cpp``) compiled on first use, same signatures as
`countdown.kernels.reference`.

Each op reads every weight row it needs once for all the tokens of a decode batch (1 to `MAX_BATCH`),
multi-threaded over rows with torch's thread pool, in fp32 from bf16, fp16 or fp32 weights. Why a C++
extension: on the 2-core CI machine `torch.mv` reaches under half of the read bandwidth and a gather
(``index_select`` + mv, ``F.embedding_bag``) copies the kept rows first; a loop that streams each kept
row once reaches the bandwidth (docs in `MEASURED.md`). It is built with ``-O3 -march=native`` (AVX2,
FMA, F16C where the CPU has them; a portable build without them otherwise) into
``$XDG_CACHE_HOME/countdown/cpu_kernels/<hash>`` (once per source, compiler flags and torch version:
about a minute on two cores; later processes load it in well under a second).

The ops are registered as torch ops too (``torch.ops.countdown_cpu.*``, with fake kernels here), so a
decode step under ``torch.compile`` traces through them without a graph break; eager calls go to the
extension's functions directly (no dispatcher on the way).

`unavailable_reason(x, *weights)` is the one check a caller makes: None when the ops serve ``x``, else
why not (no compiler, a failed build, too many tokens, a dtype or layout they do not take); the caller
then takes the reference path.

Shapes (B tokens ≤ 16, any leading dims flattened): x [..., K]; W [N, K] row-major for `linear` and the
gathered gate/up rows; ``w_down_t`` [I, H] and input-major ``w_t`` [K, N] are read row by row too.
The ops take the Triton ops' ``policy=`` (a `countdown.KernelPolicy`) and ignore it: its fields pick GPU
kernel variants, and each C++ op has one.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path

import torch

from ..options import MAX_BATCH
from .pack import ACTIVATIONS, check_gather_mode

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp"]
PORTABLE_FLAGS = ["-O3", "-fopenmp"]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "countdown" / "cpu_kernels"


def _build(flags: list[str]):
    from torch.utils import cpp_extension

    text = SOURCE.read_bytes()
    key = hashlib.sha256(text + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]
    directory = _cache_root() / key
    directory.mkdir(parents=True, exist_ok=True)
    return locked_build(directory, lambda: cpp_extension.load(
        name=f"countdown_cpu_{key}", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
        build_directory=str(directory), verbose=False))


def locked_build(directory: Path, build):
    """``build()`` while holding an OS lock on ``directory`` (released by the OS if this process dies).

    torch's own build lock is a plain file (``directory/lock``) that a build killed mid-way (Ctrl-C, a
    timeout) leaves behind, and every later process then waits on it forever. Every countdown process
    takes the OS lock first, so a ``lock`` file found while holding it is such a leftover: removed."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): torch's file lock alone
        return build()
    with open(directory / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        return build()


NAMESPACE = "countdown_cpu"  # the TORCH_LIBRARY block of cpu_kernels.cpp


def _fake_linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], W.shape[0]))


def _fake_linear_input_major(x: torch.Tensor, W_t: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], W_t.shape[1]))


def _fake_ffn(x: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, w_down_t: torch.Tensor, *rest) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]), dtype=w_down_t.dtype)


def _fake_masked_ffn(x, keep, w_gate, w_up, w_down_t, act) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]), dtype=w_down_t.dtype)


def _fake_input_sparse_linear(x, w_t, thr, channel_scale) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w_t.shape[1]))


FAKES = {"linear": _fake_linear, "linear_input_major": _fake_linear_input_major, "fused_gather_ffn": _fake_ffn,
         "coefficient_ffn": _fake_ffn, "masked_ffn": _fake_masked_ffn, "input_sparse_linear": _fake_input_sparse_linear}


@functools.cache
def _register_fakes() -> None:
    """The ops' shapes for torch.compile's tracing (once per process: the ops exist once the module loads)."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake)


@functools.cache
def _extension() -> tuple[object | None, str | None, float]:
    """(module, None, build seconds) or (None, why it is unavailable, seconds spent)."""
    t0 = time.perf_counter()
    errors = []
    for flags in (FLAGS, PORTABLE_FLAGS):
        try:
            module = _build(flags)
            _register_fakes()
            return module, None, time.perf_counter() - t0
        except Exception as e:  # a missing compiler or ninja, a failed build: report, fall back
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            first_error = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
            errors.append(f"{' '.join(flags)}: {first_error or type(e).__name__}")
    return None, "C++ extension unavailable: " + "; ".join(errors), time.perf_counter() - t0


def extension():
    """The compiled module (building it on the first call); RuntimeError with the reason if it cannot be."""
    module, reason, _ = _extension()
    if module is None:
        raise RuntimeError(reason)
    return module


def _ops():
    """The functions behind the wrappers below: the registered torch ops inside a torch.compile trace
    (opaque to the compiler, shaped by their fakes), the extension's own functions when eager."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops, NAMESPACE)
    return extension()


def build_seconds() -> float:
    """Seconds the first `extension` call took in this process (compile, or load of a cached build)."""
    return _extension()[2]


@torch.compiler.assume_constant_result  # a trace takes the answer as it is (the build ran before it)
def extension_reason() -> str | None:
    """None when the extension is built (building it now if needed), else why it is not."""
    return _extension()[1]


def weight_key(weight: torch.Tensor) -> tuple:
    """What a kept kernel verdict depends on in a weight, as plain values: which tensor object, its storage,
    dtype, shape and strides (a tuple holding the tensor itself would compare elementwise, not by identity)."""
    return id(weight), weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride()


def weights_reason(*weights: torch.Tensor) -> str | None:
    """None when the CPU ops take these weights as they are laid out, else why not. It depends on the
    weights alone, so a caller may keep the answer while they stay the same tensors (`unavailable_reason`
    is this plus `tokens_reason` plus `extension_reason`)."""
    for w in weights:
        if w.dtype not in DTYPES:
            return f"weight dtype {w.dtype} (the CPU kernels take fp32, bf16, fp16)"
        if w.device.type != "cpu":
            return f"a weight is on {w.device.type}"
        if w.dim() != 2 or not w.is_contiguous():
            return "a weight is not a contiguous 2-D tensor in the kernel layout"
    return None


def tokens_reason(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """None when the CPU ops serve decode tokens ``x`` [..., K] (on the CPU, 1 to `MAX_BATCH` of them,
    autograd not recording through them or these weights), else why not: what changes from call to call."""
    if x.device.type != "cpu":
        return f"input is on {x.device.type}, the C++ kernels run on the CPU"
    n_tokens = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if not 1 <= n_tokens <= MAX_BATCH:
        return f"{n_tokens} tokens: the CPU kernels serve decode steps of 1 to {MAX_BATCH}"
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return "autograd is recording (the CPU kernels have no backward)"
    return None


def unavailable_reason(x: torch.Tensor, *weights: torch.Tensor) -> str | None:
    """None when the CPU ops serve decode tokens ``x`` [..., K] with these weights, else why not."""
    return tokens_reason(x, *weights) or weights_reason(*weights) or extension_reason()


def _act_code(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {ACTIVATIONS}")
    return ("silu", "gelu_tanh", "gelu", "relu").index(act)


def _thr(threshold: float | torch.Tensor) -> torch.Tensor:
    """A threshold as the ops take it: a float CPU tensor of 1 or one-per-entry values, any dtype and shape
    (the C++ side converts, so a module's buffer passes as it is)."""
    if isinstance(threshold, torch.Tensor):
        return threshold
    return torch.tensor([float(threshold)])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias: x [..., K], weight [N, K] row-major, or input-major (a
    transposed view of contiguous [K, N] rows). Returns [..., N] in x's dtype."""
    if weight.is_contiguous():
        return _ops().linear(x, weight)
    return _ops().linear_input_major(x, weight.t())


def sparse_down(t: torch.Tensor, w_down_t: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """The kept rows of w_down_t [I, H] weighted by t [..., I] (|t_i| > threshold)."""
    return _ops().input_sparse_linear(t, w_down_t, _thr(threshold), None).to(w_down_t.dtype)


def coefficient_ffn(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor,
                    threshold: float | torch.Tensor, *, act: str = "silu", policy=None) -> torch.Tensor:
    """As `reference.coefficient_ffn`: gate and up densely, the kept rows of w_down_t."""
    return _ops().coefficient_ffn(x, w_gate, w_up, w_down_t, _thr(threshold), _act_code(act))


def fused_gather_ffn(x: torch.Tensor, w_dense: torch.Tensor, w_sparse: torch.Tensor, w_down_t: torch.Tensor,
                     threshold: float | torch.Tensor, *, act: str = "silu", dense: str = "gate",
                     score_act: bool | None = None, signed: bool = False, policy=None) -> torch.Tensor:
    """As `reference.fused_gather_ffn`: w_dense [I, H] densely, the kept rows of w_sparse and w_down_t."""
    score_act = check_gather_mode(dense, score_act)
    return _ops().fused_gather_ffn(x, w_dense, w_sparse, w_down_t, _thr(threshold), _act_code(act),
                                        dense == "gate", score_act, signed)


def predicted_sparse_ffn(x: torch.Tensor, score: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down_t: torch.Tensor, threshold: float | torch.Tensor, *,
                         act: str = "silu", policy=None) -> torch.Tensor:
    """As `reference.predicted_sparse_ffn`: the kept rows (score > threshold, or a bool mask) of all three."""
    keep = score if score.dtype == torch.bool else score.float() > _thr(threshold)
    return _ops().masked_ffn(x, keep, w_gate, w_up, w_down_t, _act_code(act))


def input_sparse_linear(x: torch.Tensor, w_t: torch.Tensor, threshold: float | torch.Tensor, *,
                        channel_scale: torch.Tensor | None = None, policy=None) -> torch.Tensor:
    """As `reference.input_sparse_linear`: w_t [K, N] input-major, the rows of kept input channels."""
    return _ops().input_sparse_linear(x, w_t, _thr(threshold), channel_scale)


def input_sparse_linears(x: torch.Tensor, ws_t: list[torch.Tensor], threshold: float | torch.Tensor, *,
                         channel_scale: torch.Tensor | None = None, policy=None) -> list[torch.Tensor]:
    """`input_sparse_linear` of one input through several input-major weights."""
    return [input_sparse_linear(x, w, threshold, channel_scale=channel_scale) for w in ws_t]
