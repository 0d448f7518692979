"""A merge written as a LoRA: the work that turns the recipe's result into factors, in place of values.

Per factor of the plan (one weight matrix of the LoRA file, or a 1-D tensor it cannot hold), "diff" chunks
fill a float32 buffer with the whole difference between the result and the base (the largest is the
largest tensor, not the model); with every chunk in, a truncated SVD factors it (ops/lora.py) and its down
and up go to the sink in plan order. Nothing else is held.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator

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


class Factoring:
    """The work of a LoRA output: its chunks (after the statistics passes of the steps they need, from
    `stat_passes`), each factor's SVD once its buffer is full, the factors' bytes to the sink."""

    def __init__(
        self, plan: Plan, result: Result, device: torch.device, threads: int, stat_passes: Callable[[Step], Iterator[Chunk | object]],
        ranges: Callable[[Part, Step], Iterator[tuple[int, int]]], sink: Sink, progress,
    ):
        self.plan, self.result, self.device, self.threads = plan, result, device, threads
        self.stat_passes, self.ranges, self.sink, self.progress = stat_passes, ranges, sink, progress
        self.buffers: dict[int, torch.Tensor] = {}  # factor -> its difference, being filled

    def chunks(self) -> Iterator[Chunk | object]:
        plan, result = self.plan, self.result
        for index, f in enumerate(plan.factors):
            self.buffers[index] = torch.zeros(f.shape, dtype=torch.float32, device=self.device)
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
