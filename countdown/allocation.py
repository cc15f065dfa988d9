"""Non-uniform sparsity: a target per layer, and per site where a method has several (`Allocation`).

`countdown.sparsify` takes an `Allocation` wherever it takes one sparsity: threshold mode calibrates
each (layer, site) to its own target, top-k mode keeps each layer's own count. Sites are a method's
FFN sites (`Method.sites`: TEAL and WINA have "input" and "coef") and the attention projections'
input sites "qkv" and "o" (TEAL model-wide). A leaf module: plain data and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ATTENTION_SITES = ("qkv", "o")  # as `countdown.models.ATTENTION_SITES` (a leaf cannot import it)


def _check_value(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # one error type for any bad allocation (ValueError), as for a bad length or site
        raise ValueError(f"allocation {where}: sparsity must be a number in [0, 1), got {value!r}")  # noqa: TRY004
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"allocation {where}: sparsity must be in [0, 1), got {value}")
    return float(value)


@dataclass(frozen=True, init=False)
class Allocation:
    """Target sparsity per layer (``Allocation([0.3, 0.5, ...])``: every site of layer i at the i-th
    value) or per site and layer (``Allocation({"input": [...], "coef": [...], "qkv": [...], "o": [...]})``).

    ``values[i][j]`` is layer i's target at ``sites[j]``; ``sites`` is None for a per-layer allocation
    (one value per layer, for every site). Every value is checked when the object is made: a number in
    [0, 1), the same number of layers at every site."""

    values: tuple[tuple[float, ...], ...]
    sites: tuple[str, ...] | None

    def __init__(self, layers: Sequence[float] | Mapping[str, Sequence[float]]):
        if isinstance(layers, Allocation):
            values, sites = layers.values, layers.sites
        elif isinstance(layers, Mapping):
            if not layers:
                raise ValueError("allocation names no site: give {site: [sparsity per layer], ...}")
            sites = tuple(layers)
            for site in sites:
                if not isinstance(site, str) or not site:
                    raise ValueError(f"allocation site names must be non-empty strings, got {site!r}")
            columns = [self._column(layers[site], f"site {site!r}") for site in sites]
            lengths = {len(c) for c in columns}
            if len(lengths) > 1:
                raise ValueError("allocation: every site needs one sparsity per layer, got "
                                 + ", ".join(f"{s!r}: {len(c)} layers" for s, c in zip(sites, columns)))
            values = tuple(zip(*columns))
        else:
            sites = None
            values = tuple((v,) for v in self._column(layers, "per layer"))
        object.__setattr__(self, "values", tuple(tuple(row) for row in values))
        object.__setattr__(self, "sites", sites)

    @staticmethod
    def _column(column: object, where: str) -> tuple[float, ...]:
        if isinstance(column, (str, bytes)) or not isinstance(column, Sequence):
            # a ValueError, as for every other bad allocation
            raise ValueError(f"allocation {where}: expected a list of per-layer sparsities, got {column!r}")  # noqa: TRY004
        if not column:
            raise ValueError(f"allocation {where}: no layers")
        return tuple(_check_value(v, f"{where}, layer {i}") for i, v in enumerate(column))

    @classmethod
    def uniform(cls, sparsity: float, n_layers: int, sites: Sequence[str] | None = None) -> Allocation:
        """Every layer (and every site of ``sites``) at ``sparsity``."""
        if sites is None:
            return cls([sparsity] * n_layers)
        return cls({site: [sparsity] * n_layers for site in sites})

    @property
    def n_layers(self) -> int:
        return len(self.values)

    def has(self, site: str) -> bool:
        """Whether this allocation gives ``site`` a value (a per-layer allocation gives every site one)."""
        return self.sites is None or site in self.sites

    def site_values(self, site: str) -> tuple[float, ...]:
        """The per-layer targets of ``site``."""
        if self.sites is None:
            return tuple(row[0] for row in self.values)
        if site not in self.sites:
            raise ValueError(f"allocation gives no sparsity for site {site!r}; it has {', '.join(self.sites)}")
        j = self.sites.index(site)
        return tuple(row[j] for row in self.values)

    def table(self, sites: Sequence[str], n_layers: int, what: str = "model") -> list[list[float]]:
        """[n_layers][len(sites)] targets, or a clear error when the layer count or a site does not fit."""
        if self.n_layers != n_layers:
            raise ValueError(f"allocation has {self.n_layers} layers, the {what} has {n_layers}")
        columns = [self.site_values(site) for site in sites]
        return [[column[i] for column in columns] for i in range(n_layers)]

    def check_sites(self, known: Sequence[str], method: str) -> None:
        """Refuse a site name that is not one of ``known`` (the method's sites and the attention sites)."""
        unknown = [s for s in self.sites or () if s not in known]
        if unknown:
            raise ValueError(f"allocation names unknown site(s) {', '.join(map(repr, unknown))} for method "
                             f"{method!r}; its sites are {', '.join(known)}")

    def mean(self, sites: Sequence[str] | None = None) -> float:
        """The mean target over layers (and over ``sites``; default: all of this allocation's)."""
        cols = [self.site_values(s) for s in sites] if sites is not None else [list(r) for r in zip(*self.values)]
        flat = [v for col in cols for v in col]
        return sum(flat) / len(flat)

    def to_meta(self) -> dict:
        """JSON-serialisable form (`from_meta` reads it back)."""
        return {"sites": list(self.sites) if self.sites is not None else None,
                "values": [list(row) for row in self.values]}

    @classmethod
    def from_meta(cls, meta: dict) -> Allocation:
        values, sites = meta["values"], meta.get("sites")
        if sites is None:
            return cls([row[0] for row in values])
        return cls({site: [row[j] for row in values] for j, site in enumerate(sites)})

    def summary(self) -> str:
        """One line per site: its mean and range over layers."""
        parts = []
        for site in self.sites or ("all sites",):
            col = self.site_values(site) if self.sites is not None else self.site_values("")
            parts.append(f"{site} {sum(col) / len(col):.0%} [{min(col):.0%}..{max(col):.0%}]")
        return ", ".join(parts)
