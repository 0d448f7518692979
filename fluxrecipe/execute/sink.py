"""Where a run's encoded bytes go: a sink. The executor hands a sink the bytes of each output file of the
plan, in plan order (file by file, each file's tensors in order, each tensor front to back); what a file is
(a safetensors file, a GGUF file, tensors in memory) is the sink's business.

A sink that is not files (a state dict in memory, a GGUF writer) knows the tensors' boundaries from the
plan: `plan.files[i].entries()` lists each file's tensors with their dtype and shape, in the order their
bytes come; a scaled-fp8 tensor's scale is in `result.scales` once its first bytes arrive.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Protocol

import torch

from ..formats.safetensors import ITEMSIZE, encode_header
from ..loras import as_written
from ..plan import Plan
from ..writer import open_safetensors, rewrite_header
from .result import Result


class Sink(Protocol):
    def write(self, index: int, data: torch.Tensor) -> None:
        """The next bytes (uint8) of the plan's output file `index`; files come in order, each front to back."""

    def close(self) -> None:
        """Every byte is in: finish the last file (its records go into the result)."""

    def abort(self) -> None:
        """The run failed: let go of what is open (the caller owns the folder and removes it)."""


class SafetensorsFiles:
    """The plan's safetensors files in `folder`, opened one after the other as the chunks arrive in plan order;
    each file's scales and constants follow its tensors. A LoRA output may leave matrices out
    (result.lora_left_out): its header is written with room (the header size given, else the whole plan's),
    and written again at the end, listing only what the file holds."""

    def __init__(self, plan: Plan, folder: Path, metadata: dict[str, str], header_size: int, result: Result):
        self.plan, self.folder, self.metadata, self.header_size, self.result = plan, folder, metadata, header_size, result
        self.plan_files, self.lora = plan.files, bool(plan.factors)
        self.index, self.file = -1, None

    def write(self, index: int, data: torch.Tensor) -> None:
        while index > self.index:
            self._close_current()
            self._open(self.index + 1)
        self.file.write(data.numpy())

    def _open(self, index: int) -> None:
        self.index = index
        out = self.plan_files[index]
        metadata = {**self.metadata, **dict(out.metadata)}
        room = self.header_size or (len(encode_header(out.entries(), metadata)[0]) if self.lora else 0)
        self.file = open_safetensors(self.folder / out.name, out.entries(), metadata, room)

    def _close_current(self) -> None:
        if self.file is None:
            return
        out = self.plan_files[self.index]
        for tensor in out.tensors:
            if tensor.scale_name:
                self.file.write(struct.pack("<f", self.result.scales[tensor.name]))
        left_out, ranks = self.result.lora_left_out, self.result.lora_ranks
        constants = out.constants
        if self.lora:
            entries, own, constants = as_written(out, self.plan.format, self.plan.factors, self.plan.lora_rank, left_out, ranks)
        for constant in constants:
            self.file.write(constant.data)
        header = self.file.unhashed
        if left_out or ranks:
            self.file.expected_size = header + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in entries)
        self.result.files[out.name] = self.file.close()
        self.file = None
        if left_out or ranks:
            rewrite_header(self.folder / out.name, entries, {**self.metadata, **dict(out.metadata), **own}, header)

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None
