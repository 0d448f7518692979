"""A merge written as a LoRA: the work that turns the recipe's result into factors, in place of values.

Per factor of the plan (one weight matrix of the LoRA file, or a 1-D tensor it cannot hold), "diff" chunks
fill a float32 Difference with the whole difference between the result and the base; with every chunk in, a
truncated SVD factors it (ops/lora.py) and its down and up go to the sink in plan order. Nothing else is
held. A difference over HELD bytes (on the CPU) is never held at all: it goes to an unlinked file in the
output's folder (pwrite, its pages written back and let go behind the writes, as the writer does) and the
factoring reads it back in blocks of rows (pread, let go behind the reads) for each pass of ops/lowrank.py's
range finder. So memory does not grow with the matrix (FLUX.2 dev's 55296 x 6144 is 1.4 GB in float32): a
shared mapping of that file was tried, and left the whole matrix dirty in the page cache, where a memory
cgroup (v1) cannot write it back to reclaim it. Whether the difference is zero, finite, and its largest
magnitude are folded in chunk by chunk as it arrives (a whole-size `any()` or mask would cost 1 byte per element).
"""
from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import torch

from ..errors import OutputError
from ..formats.layout import Part
from ..linux import release_freed_memory
from ..loras import Factor
from ..ops.lora import factor, relative_error
from ..ops.lowrank import block_rows
from ..plan import Plan, Step
from ..text import cut
from ..writer import RELEASE_ALIGN, WriteBehind, align_down
from .kernel import DTYPES, ChunkOut
from .reader import pread_into
from .result import Result
from .scheduler import DRAIN, Chunk
from .sink import Sink

HELD = 32 << 20  # bytes: a difference larger than this goes to a scratch file, not memory


class Factoring:
    """The work of a LoRA output: its chunks (after the statistics passes of the steps they need, from
    `stat_passes`), each factor's SVD once its buffer is full, the factors' bytes to the sink."""

    def __init__(
        self, plan: Plan, result: Result, device: torch.device, threads: int, stat_passes: Callable[[Step], Iterator[Chunk | object]],
        ranges: Callable[[Part, Step], Iterator[tuple[int, int]]], sink: Sink, progress, scratch: Path | None = None,
    ):
        self.plan, self.result, self.device, self.threads, self.scratch = plan, result, device, threads, scratch
        self.stat_passes, self.ranges, self.sink, self.progress = stat_passes, ranges, sink, progress
        self.differences: dict[int, Difference] = {}  # factor -> its difference, being filled

    def chunks(self) -> Iterator[Chunk | object]:
        plan, result = self.plan, self.result
        for index, f in enumerate(plan.factors):
            with Difference(f.shape, self.device, self.scratch) as diff:
                self.differences[index] = diff
                at = 0
                for part, base, changed in zip(f.parts, f.bases, f.changed):
                    if changed:
                        step = plan.step(part.key)
                        yield from self.stat_passes(step)
                        yield from (Chunk("diff", step, a, b, base=base, factor=index, at=at + a - part.start) for a, b in self.ranges(part, step))
                    at += part.stop - part.start
                yield DRAIN
                del self.differences[index]
                if not f.rank:
                    result.lora_unheld[f.module] = diff.largest
                    continue
                if diff.largest == 0:  # exactly the base's: a LoRA would hold zeros, which change nothing
                    result.lora_errors[f.module] = 0.0
                    result.lora_left_out.append(f.module)
                    continue
                for data in self._factor(f, diff):
                    self.sink.write(0, data)
                    self.progress.update(data.numel())
        if len(result.lora_left_out) == sum(1 for f in plan.factors if f.rank):
            raise OutputError(f"every weight matrix of the recipe's result equals the base's ({len(result.lora_left_out)} matrices): the LoRA would be empty, so nothing was written")

    def finish(self, chunk: Chunk, out: ChunkOut) -> None:
        self.differences[chunk.factor].put(chunk.at, out.data)

    def _factor(self, f: Factor, diff: Difference) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded down and up of one factor; its relative error goes into the result. Runs while the
        workers wait, so the SVD gets torch's own threads."""
        dtype = DTYPES[next(t.dtype for t in self.plan.files[0].tensors if t.name == f.down)]
        if not math.isfinite(diff.largest):
            raise OutputError(f"'{cut(f.module)}': its difference to the base holds NaN/Inf values (from the inputs): a LoRA cannot be factored from it")
        release_freed_memory()  # the workers' chunk buffers, idle now: the factoring's threads allocate their own
        torch.set_num_threads(self.threads)
        try:
            up, down = factor(diff.rows, f.shape, f.rank, f.exact, zlib.crc32(f.module.encode()), self.plan.lora_energy)
            if self.plan.lora_energy is not None:
                self.result.lora_ranks[f.module] = up.shape[1]
            up, down = up.to(dtype), down.to(dtype)
            if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
                raise OutputError(f"'{cut(f.module)}': its LoRA factors do not fit {dtype} (values beyond its range): write the LoRA in fp32 (dtype=fp32)")
            self.result.lora_errors[f.module] = relative_error(diff.rows, f.shape, up.float(), down.float())
        finally:
            torch.set_num_threads(1)
            release_freed_memory()  # and theirs, before the workers start again
        return down.contiguous().cpu().reshape(-1).view(torch.uint8), up.contiguous().cpu().reshape(-1).view(torch.uint8)  # flat first: a rank-1 factor is "contiguous" with any stride


class Difference:
    """One factor's difference to the base, float32, put in chunk by chunk (in order, parts the recipe leaves
    unchanged skipped: they stay zero) and read back as rows, any number of times: a tensor in memory, or, over
    HELD bytes on the CPU with a folder to put it in, an unlinked file there whose page cache is let go behind
    every write and read. `largest`: max |element| so far (NaN or inf where one is not finite; 0 for none)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, scratch: Path | None):
        self.shape, self.largest = shape, 0.0
        self.numel = math.prod(shape)
        self.held: torch.Tensor | None = None
        self.fd: int | None = None
        if self.numel * 4 <= HELD or device.type != "cpu" or scratch is None:
            self.held = torch.zeros(self.numel, dtype=torch.float32, device=device)
            return
        try:
            self.fd, path = tempfile.mkstemp(prefix=".difference-", dir=scratch)
            os.unlink(path)  # the descriptor keeps the file until it is closed
            os.ftruncate(self.fd, self.numel * 4)  # zeros (a sparse file) where nothing is put
        except OSError as e:
            self.close()
            raise OutputError(f"{scratch}: cannot make a scratch file for a difference of {self.numel * 4} bytes: {e.strerror}") from None
        self.writeback = WriteBehind(self.fd)

    def __enter__(self) -> Difference:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def put(self, at: int, data: torch.Tensor) -> None:
        """Elements [at, at + data.numel()) of the flattened difference."""
        if data.numel():
            least, most = torch.aminmax(data)  # no |data| copy; maximum propagates a NaN
            peak = float(torch.maximum(-least, most))
            if not math.isnan(self.largest) and not peak <= self.largest:  # larger, or NaN (which then stays)
                self.largest = peak
        if self.held is not None:
            self.held[at : at + data.numel()] = data
            return
        view = memoryview(data.to(torch.float32).contiguous().numpy()).cast("B")
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], at * 4 + done)
        except OSError as e:
            raise OutputError(f"the scratch file of a difference (in the output's folder): write failed: {e.strerror}") from None
        self.writeback.written(at * 4 + len(view))

    def rows(self) -> Iterator[torch.Tensor]:
        """The difference (2-D) top to bottom: the tensor itself, or blocks of ops/lowrank.py's block_rows read
        from the file (fresh tensors), the pages of each let go once read."""
        if self.held is not None:
            yield self.held.view(self.shape)
            return
        height, width = self.shape
        step, released = block_rows(width), 0
        for first in range(0, height, step):
            block = torch.empty(min(step, height - first), width, dtype=torch.float32)
            view, offset = memoryview(block.numpy()).cast("B"), first * width * 4
            try:
                whole = pread_into(self.fd, view, offset)
            except OSError as e:
                raise OutputError(f"the scratch file of a difference (in the output's folder): read failed: {e.strerror}") from None
            if not whole:
                raise OutputError("the scratch file of a difference (in the output's folder) ended early: it was changed during the merge")
            end = align_down(offset + len(view))
            if end - released >= RELEASE_ALIGN:
                os.posix_fadvise(self.fd, released, end - released, os.POSIX_FADV_DONTNEED)
                released = end
            yield block
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self.held = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
