"""What every kernel file shares at run time: programmatic dependent launch, deterministic mode and its
ordered workspaces, the persistent zero-on-exit workspace with the split-K epilogue that keeps it zero,
the SM count, and the eager/compiled dispatch of the registered ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TRITON_HAS_PDL = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


# --------------------------------------------------------------------------------------------
# programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the kernel
# before it drains, and waits (``gdc_wait``) before it first touches memory. `countdown.KernelPolicy.pdl`
# (on by default) asks for it; H100, compiled decode step with Inductor's kernels on it too: +2% dense,
# +2.4% M-COUNTDOWN 70% + attention 50%, +5.5% TEAL 50% (docs/BENCHMARKS.md).


def pdl_launch(device: torch.device, pdl: bool = True) -> bool:
    """Whether a kernel on ``device`` launches with programmatic dependent launch when ``pdl`` asks for it."""
    return (pdl and _TRITON_HAS_PDL and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def pdl_meta(device: torch.device, pdl: bool = True) -> dict:
    """The launch arguments that turn programmatic dependent launch on for a kernel with a PDL
    constexpr (none when it is off, so the interpreter never sees them)."""
    return {"PDL": True, "launch_pdl": True} if pdl_launch(device, pdl) else {}


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel's writes are visible, then let the next kernel launch.
    Every program runs it before its first load of anything a previous kernel wrote, and every
    program waits before it signals, so a kernel after this one never overtakes the one before."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


# --------------------------------------------------------------------------------------------
# deterministic mode


def deterministic() -> bool:
    """Whether the split-K kernels must give bitwise-repeatable results: PyTorch's own switch,
    ``torch.use_deterministic_algorithms(True)`` (``warn_only=True`` counts too). Read at launch, so a
    CUDA graph keeps the mode it was captured in.

    By default programs that share outputs add their fp32 partials with atomics, whose order varies from
    run to run, so the last bits of a result (and, through near-tied argmaxes, greedy tokens) may differ
    between two calls. In deterministic mode each program writes its partials to a slice of its own and
    they are summed in a fixed order (one extra small reduction per call)."""
    return torch.are_deterministic_algorithms_enabled()


def ordered_workspace(splits: int, numel: int, device: torch.device) -> torch.Tensor | None:
    """In deterministic mode with more than one split: an fp32 buffer of ``splits`` slices of ``numel``
    (each split writes all of its slice, so no zero fill), for the launcher to sum in split order after
    the kernel. Otherwise None: the kernel adds its partials with atomics (`split_k_epilogue`)."""
    if splits > 1 and deterministic():
        return torch.empty(splits * numel, dtype=torch.float32, device=device)
    return None


# --------------------------------------------------------------------------------------------
# the persistent workspace and the split-K epilogue

# One zero-on-exit int32 workspace per (device, size): fp32 partial sums then int32 tickets, carved by
# each launcher. Kernels on one stream run one after another, so they can share it; ops must not run
# concurrently on two streams of one device.
_PERSISTENT_WS: dict[tuple[str, int | None, int], torch.Tensor] = {}


def persistent_workspace(device: torch.device, size: int) -> torch.Tensor:
    """The zero int32 buffer of ``size`` elements for ``device``; every kernel leaves it zero on exit."""
    key = (device.type, device.index, size)
    ws = _PERSISTENT_WS.get(key)
    if ws is None:
        ws = torch.zeros(size, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # first use inside a CUDA graph capture: the zero fill only runs when the graph replays, so
            # this buffer is the graph's own (filled before its kernel at every replay), not kept for others
            return ws
        _PERSISTENT_WS[key] = ws
    return ws


@triton.jit
def split_k_epilogue(acc, ws, out, mask, ticket_ptr, splits):
    """The sum over ``splits`` programs that share one output tile, in one launch.

    acc: this program's fp32 partials (any block shape); ws, out: blocks of pointers of acc's shape into
    the fp32 workspace (zero on entry) and the output; mask: acc's valid lanes; ticket_ptr: the tile's
    int32 ticket (zero on entry). Every program adds acc into ws with relaxed atomics and takes a ticket;
    the last one reads the totals, casts them into out and leaves ws and the ticket zero again."""
    tl.atomic_add(ws, acc, mask=mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds precede this program's ticket
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == splits - 1:
        zero = tl.zeros_like(acc)
        tot = tl.atomic_add(ws, zero, mask=mask, sem="relaxed")  # read where the adds landed (L2)
        tot = tl.where(mask, tot, 0.0)  # masked lanes are undefined (an fp16 cast overflows in the interpreter)
        tl.debug_barrier()  # every thread's reads precede any thread's zeroing (their layouts may differ)
        tl.store(ws, zero, mask=mask)
        tl.store(ticket_ptr, 0)
        tl.store(out, tot.to(out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# misc


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA: the interpreter's grids stay small)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def op_or_impl(op, impl):
    """The registered op under torch.compile (opaque to the compiler, with its fake kernel); the plain
    implementation when eager, which skips the custom-op dispatch (about 20 us a call on a CPU)."""
    return op if torch.compiler.is_compiling() else impl
