"""How a plan is executed: plain data, free of torch, so that planning and dry runs never import it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    device: str = "cpu"
    threads: int = 0  # 0: chosen from the machine's cores
    chunk_elements: int = 1 << 20  # elements per unit of work, exactly (a step with a LoRA rounds it to whole blocks of 64 rows)
    in_flight: int = 256 << 20  # bytes of work in flight at most: read, being computed, or waiting to be written
    nonfinite: str = "error"  # "error": stop at the first NaN/Inf in an input or result; "warn": count them and go on
    diagnostics: bool = True
    progress: bool = True
    overwrite: bool = False

    @property
    def workers(self) -> int:
        return self.threads if self.threads > 0 else min(8, (os.cpu_count() or 1) + 2)

    @property
    def most_items(self) -> int:
        """Units of work in flight at most, however small: beyond a few per worker they only cost bookkeeping."""
        return 4 * self.workers
