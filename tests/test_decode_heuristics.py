"""`countdown.decode_heuristics`: which reductions the compiled decode step keeps persistent."""

from types import SimpleNamespace

import pytest
import sympy

pytest.importorskip("torch._inductor.choices")
from torch._inductor import config  # noqa: E402
from torch._inductor.choices import InductorChoices  # noqa: E402
from torch._inductor.sizevars import SizeVarAllocator  # noqa: E402
from torch._inductor.virtualized import V  # noqa: E402

from countdown.decode_heuristics import DecodeChoices  # noqa: E402


class Features(SimpleNamespace):
    """The two sizes the heuristic reads, and the hint Inductor's own rule asks for."""

    def get_reduction_hint(self):
        from torch._inductor.runtime.hints import ReductionHint

        return ReductionHint.INNER


def persistent(choices, rows: int, length: int) -> bool:
    features = Features(numel=sympy.Integer(rows), reduction_numel=sympy.Integer(length))
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        return choices.should_use_persistent_reduction(features, cooperative_reduction=False)


@pytest.mark.parametrize("rows, length", [(1, 4096), (1, 2048), (3, 5120), (16, 16384), (1, 576)])
def test_decode_rows_are_persistent(rows, length):
    # the step's RMSNorm rows (batch 1-16, hidden sizes up to 16k): one pass over the row in registers
    assert persistent(DecodeChoices(), rows, length)


@pytest.mark.parametrize("rows, length", [(1, 4096), (16, 8192)])
def test_inductor_default_loops_over_those_rows(rows, length):
    # what the default heuristic does with the same rows, i.e. what the hook changes
    assert not persistent(InductorChoices(), rows, length)


@pytest.mark.parametrize("rows, length", [(17, 4096), (4096, 4096), (1, 128256)])
def test_other_reductions_keep_inductor_rule(rows, length):
    # prefill rows, matmul-like reductions and the vocabulary argmax: Inductor's own decision
    assert persistent(DecodeChoices(), rows, length) == persistent(InductorChoices(), rows, length)


def test_off_when_inductor_persistent_reductions_are_off():
    with config.patch({"triton.persistent_reductions": False}):
        assert not persistent(DecodeChoices(), 1, 4096)


def test_choices_have_a_cache_key_that_names_the_limits():
    # torch >= 2.12 puts the choices class in the FX-graph cache key and refuses one without uuid()
    key = DecodeChoices().uuid()
    assert "16384" in key and key == DecodeChoices().uuid()
