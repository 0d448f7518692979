"""How a plan is executed: plain data, free of torch, so that planning and dry runs never import it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .diagnostics import SEGMENT


@dataclass(frozen=True)
class Options:
    device: str = "cpu"
    threads: int = 0  # 0: chosen from the machine's cores
    chunk_elements: int = 1 << 20  # rounded up to whole diagnostics segments (see chunk)
    nonfinite: str = "error"  # "error": stop at the first NaN/Inf in an input or output; "warn": count them and go on
    diagnostics: bool = True
    progress: bool = True
    overwrite: bool = False

    @property
    def workers(self) -> int:
        return self.threads if self.threads > 0 else min(8, (os.cpu_count() or 1) + 2)

    @property
    def chunk(self) -> int:
        """Elements per chunk: a whole number of SEGMENTs, so the diagnostics' partial sums sit at fixed places."""
        return -(-max(self.chunk_elements, 1) // SEGMENT) * SEGMENT

    @property
    def window(self) -> int:
        """Chunks in flight at most: read, being computed, or waiting to be written."""
        return 2 * self.workers
