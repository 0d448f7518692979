"""What a run reports: the files written, what was counted on the way, and the totals of the observers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..diagnostics import Distances
from ..writer import FileRecord


@dataclass
class Result:
    files: dict[str, FileRecord]  # file name -> size and sha256 (the data's, for a header written again)
    seconds: float
    bytes_read: int  # from the sources: the plan's bytes once, and again for each statistics pass
    bytes_written: int
    nonfinite: dict[str, int] = field(default_factory=dict)  # "source: key" or "output: key" -> NaN/Inf values
    clamped: dict[str, int] = field(default_factory=dict)  # output tensor -> values beyond its dtype's range
    scales: dict[str, float] = field(default_factory=dict)  # scaled-fp8 tensor -> its scale
    source_hashes: dict[str, str] = field(default_factory=dict)  # source -> "xxh3-128:HEX" of the tensor bytes read
    distances: Distances | None = None
    peak_in_flight: int = 0  # bytes
    output: Path | None = None  # where the output went (set by api.write, once it is in place)
    lora_errors: dict[str, float] = field(default_factory=dict)  # a LoRA output: module -> relative error of its factors
    lora_unheld: dict[str, float] = field(default_factory=dict)  # a LoRA output: 1-D tensor -> largest |difference| to the base
    lora_left_out: list[str] = field(default_factory=list)  # a LoRA output: the matrices whose difference is exactly 0 (not written)
    lora_ranks: dict[str, int] = field(default_factory=dict)  # a LoRA made of LoRAs: module -> the rank written
