"""Inductor heuristics for the compiled decode step (`countdown.decode.Decoder(compile=True)`).

A decode step's RMSNorms reduce one hidden-size row per token. Inductor keeps a reduction in registers
("persistent": one pass over the row) only up to 1024 elements, so at hidden size 4096 every norm that
does not fuse into a matmul (each norm in front of our sparse kernels, which Inductor cannot fuse into)
becomes one program walking the row twice: latency-bound, ~6 us on an H100. `DecodeChoices` compiles
a reduction over at most `ROWS` rows of at most `LENGTH` elements persistently instead.

Imported only when a Decoder compiles (it imports Inductor). Its class is named in the compile options
(``inductor_choices_class``), so Inductor's cache keys of these graphs differ from the default's.
"""

from __future__ import annotations

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.virtualized import V

ROWS, LENGTH = 16, 16384


class DecodeChoices(InductorChoices):
    def uuid(self) -> str:
        """Identifies these heuristics in Inductor's cache keys (newer torch refuses a choices class
        without one; the key changes whenever the limits do)."""
        return f"countdown.decode_heuristics.DecodeChoices(rows={ROWS},length={LENGTH})"

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        sizes = V.graph.sizevars
        if (config.triton.persistent_reductions and not cooperative_reduction
                and sizes.statically_known_leq(features.numel, ROWS)
                and sizes.statically_known_leq(features.reduction_numel, LENGTH)):
            return True
        return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)
