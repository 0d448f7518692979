"""A merge written as a LoRA: the work that turns the recipe's result into factors, in place of values.

Per factor of the plan (one weight matrix of the LoRA file, or a 1-D tensor it cannot hold), "diff" chunks
fill a float32 buffer with the whole difference between the result and the base; with every chunk in, a
truncated SVD factors it (ops/lora.py) and its down and up go to the sink in plan order. Nothing else is
held. A buffer over HELD bytes (on the CPU) is a file in the output's folder mapped into memory: the kernel
writes its pages back and lets them go under memory pressure, and the factoring reads it in blocks of rows
(ops/lowrank.py's range finder, over fixed float64 blocks), so memory does not grow with the matrix (FLUX.2
dev's 55296 x 6144 is 1.4 GB in float32).
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..errors import OutputError
from ..formats.layout import Part
from ..loras import Factor
from ..ops.lora import factor, relative_error
from ..plan import Plan, Step
from ..text import cut
from .kernel import DTYPES, ChunkOut
from .result import Result
from .scheduler import DRAIN, Chunk
from .sink import Sink

HELD = 256 << 20  # bytes: a difference larger than this is mapped from a file, not held in memory


class Factoring:
    """The work of a LoRA output: its chunks (after the statistics passes of the steps they need, from
    `stat_passes`), each factor's SVD once its buffer is full, the factors' bytes to the sink."""

    def __init__(
        self, plan: Plan, result: Result, device: torch.device, threads: int, stat_passes: Callable[[Step], Iterator[Chunk | object]],
        ranges: Callable[[Part, Step], Iterator[tuple[int, int]]], sink: Sink, progress, scratch: Path | None = None,
    ):
        self.plan, self.result, self.device, self.threads, self.scratch = plan, result, device, threads, scratch
        self.stat_passes, self.ranges, self.sink, self.progress = stat_passes, ranges, sink, progress
        self.buffers: dict[int, torch.Tensor] = {}  # factor -> its difference, being filled

    def chunks(self) -> Iterator[Chunk | object]:
        plan, result = self.plan, self.result
        for index, f in enumerate(plan.factors):
            self.buffers[index] = self._buffer(f.shape)
            at = 0
            for part, base, changed in zip(f.parts, f.bases, f.changed):
                if changed:
                    step = plan.step(part.key)
                    yield from self.stat_passes(step)
                    yield from (Chunk("diff", step, a, b, base=base, factor=index, at=at + a - part.start) for a, b in self.ranges(part, step))
                at += part.stop - part.start
            yield DRAIN
            diff = self.buffers.pop(index)
            if not f.rank:
                result.lora_unheld[f.module] = float(diff.abs().max()) if diff.numel() else 0.0
                continue
            if not bool(diff.any()):  # exactly the base's: a LoRA would hold zeros, which change nothing
                result.lora_errors[f.module] = 0.0
                result.lora_left_out.append(f.module)
                continue
            for data in self._factor(f, diff):
                self.sink.write(0, data)
                self.progress.update(data.numel())
        if len(result.lora_left_out) == sum(1 for f in plan.factors if f.rank):
            raise OutputError(f"every weight matrix of the recipe's result equals the base's ({len(result.lora_left_out)} matrices): the LoRA would be empty, so nothing was written")

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed float32 buffer for a difference: in memory, or (over HELD bytes, on the CPU, with a folder to
        put it in) an unlinked file of the folder, mapped."""
        numel = math.prod(shape)
        if numel * 4 <= HELD or self.device.type != "cpu" or self.scratch is None:
            return torch.zeros(shape, dtype=torch.float32, device=self.device)
        handle, path = tempfile.mkstemp(prefix=".difference-", dir=self.scratch)
        try:
            return torch.from_file(path, shared=True, size=numel, dtype=torch.float32).view(shape)
        finally:
            os.close(handle)
            os.unlink(path)  # the mapping keeps the file until the buffer goes

    def finish(self, chunk: Chunk, out: ChunkOut) -> None:
        self.buffers[chunk.factor].view(-1)[chunk.at : chunk.at + chunk.stop - chunk.start] = out.data

    def _factor(self, f: Factor, diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded down and up of one factor; its relative error goes into the result. Runs while the
        workers wait, so the SVD gets torch's own threads."""
        dtype = DTYPES[next(t.dtype for t in self.plan.files[0].tensors if t.name == f.down)]
        if not math.isfinite(float(diff.sum())) and not bool(torch.isfinite(diff).all()):  # the sum first: no whole-size mask
            raise OutputError(f"'{cut(f.module)}': its difference to the base holds NaN/Inf values (from the inputs): a LoRA cannot be factored from it")
        torch.set_num_threads(self.threads)
        try:
            up, down = factor(diff, f.rank, f.exact, zlib.crc32(f.module.encode()), self.plan.lora_energy)
            if self.plan.lora_energy is not None:
                self.result.lora_ranks[f.module] = up.shape[1]
            up, down = up.to(dtype), down.to(dtype)
            if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
                raise OutputError(f"'{cut(f.module)}': its LoRA factors do not fit {dtype} (values beyond its range): write the LoRA in fp32 (dtype=fp32)")
            self.result.lora_errors[f.module] = relative_error(diff, up.float(), down.float())
        finally:
            torch.set_num_threads(1)
        return down.contiguous().cpu().reshape(-1).view(torch.uint8), up.contiguous().cpu().reshape(-1).view(torch.uint8)  # flat first: a rank-1 factor is "contiguous" with any stride
