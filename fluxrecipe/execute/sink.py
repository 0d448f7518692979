"""Where a run's encoded bytes go: a sink. The executor hands a sink the bytes of each output file of the
plan, in plan order (file by file, each file's tensors in order, each tensor front to back); what a file is
(a safetensors file, a GGUF file, tensors in memory) is the sink's business.

A sink that is not files (a state dict in memory, a GGUF writer) knows the tensors' boundaries from the
plan: `plan.files[i].entries()` lists each file's tensors with their dtype and shape, in the order their
bytes come; a scaled-fp8 tensor's scale is in `result.scales` once its first bytes arrive.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path
from typing import Protocol

import torch

from ..errors import OutputError, UsageError
from ..formats.safetensors import ITEMSIZE, encode_header
from ..loras import as_written
from ..plan import Plan
from ..writer import FileRecord, open_safetensors, rewrite_header
from .kernel import DTYPES
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


class InMemory(SafetensorsFiles):
    """The plan's output as tensors in memory, by canonical key (the family's diffusers parameter names),
    in the output's dtype: each output tensor's bytes go to the element ranges of the canonical tensors it is
    made of (its parts), so any layout without arithmetic (diffusers' as is, BFL's fused tensors split back)
    lands as the same state dict. No file is written; the records of the files are made all the same (the
    bytes a file would hold, hashed as they pass), so the output's manifest proves a later written rebuild.
    Scaled fp8 and a merge written as a LoRA store something else than the tensors' values: refused."""

    def __init__(self, plan: Plan, metadata: dict[str, str], header_size: int, result: Result):
        scaled = next((t.name for f in plan.files for t in f.tensors if t.scale_name), None)
        if plan.factors or scaled or any(f.constants for f in plan.files):
            what = "a LoRA" if plan.factors else f"scaled fp8 ('{scaled}')" if scaled else "ComfyUI's quantization markers"
            raise UsageError(f"format={plan.format}: this output holds {what}, not the transformer's tensors: a merge in memory takes format=diffusers")
        super().__init__(plan, Path(), metadata, header_size, result)
        self.tensors: dict[str, torch.Tensor] = {}
        self._targets: list[list[torch.Tensor]] = []  # per file: the uint8 views its bytes fill, in order
        for out in plan.files:
            views = []
            for tensor in out.tensors:
                for part in tensor.parts:
                    if part.key not in self.tensors:
                        self.tensors[part.key] = torch.empty(plan.step(part.key).shape, dtype=DTYPES[tensor.dtype])
                    flat = self.tensors[part.key].view(-1).view(torch.uint8)
                    size = ITEMSIZE[tensor.dtype]
                    views.append(flat[part.start * size : part.stop * size])
            self._targets.append(views)
        self._view, self._filled = 0, 0  # the view being filled in the current file, and its bytes so far

    def write(self, index: int, data: torch.Tensor) -> None:
        if index != self.index:
            self._view, self._filled = 0, 0
        super().write(index, data)
        views, done = self._targets[index], 0
        while done < data.numel():
            view = views[self._view]
            n = min(view.numel() - self._filled, data.numel() - done)
            view[self._filled : self._filled + n].copy_(data[done : done + n])
            done, self._filled = done + n, self._filled + n
            if self._filled == view.numel():
                self._view, self._filled = self._view + 1, 0

    def _open(self, index: int) -> None:
        self.index = index
        out = self.plan_files[index]
        header, data_size = encode_header(out.entries(), {**self.metadata, **dict(out.metadata)}, self.header_size)
        self.file = _Hashed(len(header) + data_size, len(header) if self.header_size else 0)
        self.file.write(header)


class _Hashed:
    """A file that is never written: the size and sha256 its bytes would give (writer.StreamingFile's record)."""

    def __init__(self, expected_size: int, unhashed: int):
        self.expected_size, self.unhashed, self.size = expected_size, unhashed, 0
        self._hash = hashlib.sha256()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self._hash.update(view[max(0, min(self.unhashed - self.size, len(view))) :])
        self.size += len(view)

    def close(self) -> FileRecord:
        if self.size != self.expected_size:
            raise OutputError(f"a file held in memory got {self.size} bytes, expected {self.expected_size}")
        return FileRecord(self.size, self._hash.hexdigest())

    def abort(self) -> None:
        """Nothing is open."""
