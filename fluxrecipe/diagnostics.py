"""Weight-space diagnostics gathered while merging: per block, how far the merge moved from each source.

For block B and source S: sqrt(sum ||merged - S||^2) / sqrt(sum ||S||^2) over B's tensors that were read
from S, the merged tensor being what was written (after rounding). 0 means the block is S's; for
lerp:A between two sources the distance to the first is about A * ||first - second|| / ||first||. The sums
come from the chunks the executor has in hand anyway: no second pass over the data.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

BLOCK = re.compile(r"^((?:single_)?transformer_blocks)\.(\d+)\.")
OUTPUT_LAYERS = ("norm_out.", "proj_out.")


def block_of(key: str) -> str:
    """'transformer_blocks.7', 'single_transformer_blocks.12', 'embedders' or 'output'."""
    m = BLOCK.match(key)
    if m:
        return f"{m[1]}.{m[2]}"
    return "output" if key.startswith(OUTPUT_LAYERS) else "embedders"


def _block_order(block: str) -> tuple:
    m = re.fullmatch(r"((?:single_)?transformer_blocks)\.(\d+)", block)
    if m:
        return (1 if m[1] == "transformer_blocks" else 2, int(m[2]))
    return (0, 0) if block == "embedders" else (3, 0)


class Distances:
    """Accumulates per (block, source): squared distance of the merge to the source, squared norm of the source."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))

    def add(self, key: str, source: str, squared_distance: float, squared_norm: float) -> None:
        s = self._sums[block_of(key)][source]
        s[0] += squared_distance
        s[1] += squared_norm

    def relative(self) -> dict[str, dict[str, float | None]]:
        """block -> source -> relative distance, blocks in model order, rounded to 6 significant digits."""
        return {
            block: {src: _ratio(d, n) for src, (d, n) in by_source.items()}
            for block, by_source in sorted(self._sums.items(), key=lambda kv: _block_order(kv[0]))
        }

    def overall(self) -> dict[str, float | None]:
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for by_source in self._sums.values():
            for src, (d, n) in by_source.items():
                totals[src][0] += d
                totals[src][1] += n
        return {src: _ratio(d, n) for src, (d, n) in totals.items()}


def _ratio(squared_distance: float, squared_norm: float) -> float | None:
    """None where no relative distance exists: a source block of zeros, or NaN/Inf in the inputs."""
    if not (math.isfinite(squared_distance) and math.isfinite(squared_norm)):
        return None
    if squared_norm == 0.0:
        return 0.0 if squared_distance == 0.0 else None
    return float(f"{math.sqrt(squared_distance / squared_norm):.6g}")
