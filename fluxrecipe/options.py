"""How a plan is executed: plain data, free of torch, so that planning and dry runs never import it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import UsageError

ENGINE_ONLY = ("chunk_elements", "device", "nonfinite", "diagnostics")  # what only the merge engine reads (threads and in_flight: a recipe of LoRAs alone too)


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

    def __post_init__(self) -> None:
        """Every option of its kind and range, whoever builds Options (the command line, or the Python API)."""
        for name, least in (("threads", 0), ("chunk_elements", 1), ("in_flight", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise UsageError(f"{name}={value!r}: must be a whole number" + (" (0: automatic)" if least == 0 else " above 0"))
        if self.nonfinite not in ("error", "warn"):
            raise UsageError(f"nonfinite={self.nonfinite!r}: choose error or warn")
        for name in ("diagnostics", "progress", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name}={getattr(self, name)!r}: must be true or false")
        if not isinstance(self.device, str):
            raise UsageError(f"device={self.device!r}: choose cpu, cuda or cuda:N")

    @property
    def workers(self) -> int:
        return self.threads if self.threads > 0 else min(8, (os.cpu_count() or 1) + 2)

    @property
    def compute_workers(self) -> int:
        """Workers for work that never waits on a read (a recipe of LoRAs alone): one per core, at most 8; a
        worker beyond them only holds its memory longer."""
        return self.threads if self.threads > 0 else min(8, os.cpu_count() or 1)

    @property
    def most_items(self) -> int:
        """Units of work in flight at most, however small: beyond a few per worker they only cost bookkeeping."""
        return 4 * self.workers


def refuse_unused(given: dict[str, object], lora_alone: bool, single_file: bool, output_format: str) -> None:
    """Options given (name -> value as the person wrote it) that the run would ignore are refused, whoever
    gives them (the command line, or the Python API): the merge engine's own for a recipe of LoRAs alone,
    which is combined module by module on the CPU; diagnostics for a one-file format, which carries none."""
    engine = sorted(k for k in ENGINE_ONLY if k in given)
    if engine and lora_alone:
        shown = ", ".join(f"{k}={_as_written(given[k])}" for k in engine)
        raise UsageError(f"{shown} changes nothing: a recipe of LoRAs alone (no sources) is combined module by module on the CPU, not by the merge engine; leave {' and '.join(engine)} out")
    if "diagnostics" in given and single_file:
        raise UsageError(
            f"diagnostics={_as_written(given['diagnostics'])} changes nothing: format={output_format} writes one file, which carries no diagnostics "
            "(none are computed); diagnostics.json is written beside a folder's shards (format=diffusers)"
        )


def _as_written(value: object) -> str:
    """An option's value as a person writes it on the command line (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
