"""Weight-space diagnostics gathered while merging: per block, how far the merge moved from each source.

Blocks are named in canonical keys, as the model's family groups them: a group's canonical name and the
block's number, 'embedders' (everything before the blocks) and 'output' (after them).

For block B and source S: sqrt(sum ||merged - S||^2) / sqrt(sum ||S||^2) over B's tensors that were read
from S, the merged tensor being what was written (after rounding). 0 means the block is S's; for
lerp:A between two sources the distance to the first is about A * ||first - second|| / ||first||. The sums
come from the chunks the executor has in hand anyway (no second pass over the data), per fixed segment
(segments.py), so the numbers depend on the tensors alone, not on chunks, threads or output layout.
"""

from __future__ import annotations

import math
from collections import defaultdict

from . import families
from .families import Family


def block_order(block: str) -> tuple:
    """Model order of a block name diagnostics report (any family's): what sweeps sort their plots by."""
    return families.diagnostic_order(block)


class Distances:
    """Per (block, source): the squared distance of the merge to the source and the squared norm of the source.

    `add` takes each tensor's totals once they are complete: exact sums (math.fsum) of per-segment partial
    sums, so that block totals, also summed with math.fsum, depend on the tensors alone."""

    def __init__(self, family: Family) -> None:
        self.family = family
        self._tensors: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)

    def add(self, key: str, source: str, squared_distance: float, squared_norm: float) -> None:
        block_d, block_n = self._tensors[self.family.diagnostic_block(key)].setdefault(source, ([], []))
        block_d.append(squared_distance)
        block_n.append(squared_norm)

    def relative(self) -> dict[str, dict[str, float | None]]:
        """block -> source -> relative distance, blocks in model order, rounded to 6 significant digits."""
        return {
            block: {src: _ratio(math.fsum(d), math.fsum(n)) for src, (d, n) in by_source.items()}
            for block, by_source in sorted(self._tensors.items(), key=lambda kv: block_order(kv[0]))
        }

    def overall(self) -> dict[str, float | None]:
        totals: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for by_source in self._tensors.values():
            for src, (d, n) in by_source.items():
                totals[src][0].extend(d)
                totals[src][1].extend(n)
        return {src: _ratio(math.fsum(d), math.fsum(n)) for src, (d, n) in totals.items()}


def _ratio(squared_distance: float, squared_norm: float) -> float | None:
    """None where no relative distance exists: a source block of zeros, or NaN/Inf in the inputs."""
    if not (math.isfinite(squared_distance) and math.isfinite(squared_norm)):
        return None
    if squared_norm == 0.0:
        return 0.0 if squared_distance == 0.0 else None
    return float(f"{math.sqrt(squared_distance / squared_norm):.6g}")
