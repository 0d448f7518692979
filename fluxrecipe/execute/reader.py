"""Reading a plan's inputs: `pread` of byte ranges from file descriptors shared by the workers, and the page
cache behind every read let go as the merge moves on, so that a merge's memory does not grow with the model.
"""

from __future__ import annotations

import bisect
import os
import threading
from dataclasses import dataclass, field

import torch

from ..errors import SourceError
from ..formats.layout import TensorRef
from ..plan import Plan
from ..text import cut
from ..writer import align_down, align_up

READAHEAD_REACH = 32 << 20  # how far past a read the kernel's read-ahead may reach (2 x read_ahead_kb; 8 MB disks exist)


class Reader:
    """pread of byte ranges, from file descriptors shared by the workers; consumed pages are let go.

    Releasing each chunk's own (unaligned) range would keep about half of every file cached (see
    writer.RELEASE_ALIGN), so each file remembers the byte ranges done so far (merged: a handful of ranges,
    however many reads), bytes the plan never reads counting as done from the start (a header, a LoRA's alpha
    scalars, a dropped tensor), and a finished read releases the whole RELEASE_ALIGN blocks around it that lie
    inside what is done. That holds for reads in file order and for reads in another order alike (an output
    layout that is not the source's: diffusers read in BFL order jumps back and forth), where letting go only
    behind a frontier stranded the pages of every read that finished ahead of it: 0.9 GB at full size.
    """

    def __init__(self, planned: dict[str, list[tuple[int, int]]]) -> None:
        self._planned = planned  # file -> the byte ranges the plan reads there
        self._files: dict[str, InputFile] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes read so far (all threads): what a test of the number of passes counts

    def _file(self, path: str) -> InputFile:
        with self._lock:
            if path not in self._files:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise SourceError(f"{path}: cannot open: {e.strerror}") from None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._files[path] = InputFile(fd)
                for begin, end in gaps(self._planned.get(path, []), os.fstat(fd).st_size):
                    self._files[path].done(begin, end)
            return self._files[path]

    def read(self, ref: TensorRef, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the tensor `ref`, as raw bytes (uint8)."""
        ranges = ref.byte_ranges(start, stop)
        buf = torch.empty(sum(r.nbytes for r in ranges), dtype=torch.uint8)
        view = memoryview(buf.numpy())
        at = 0
        for r in ranges:
            self._pread(r.file, r.begin, view[at : at + r.nbytes], ref.file_key)
            at += r.nbytes
        return buf

    def _pread(self, path: str, offset: int, view: memoryview, what: str) -> None:
        f = self._file(path)
        try:
            whole = pread_into(f.fd, view, offset)
        except OSError as e:
            raise SourceError(f"{path}: reading '{cut(what)}' failed: {e.strerror}") from None
        if not whole:
            raise SourceError(f"{path}: the file ended while reading '{cut(what)}': it was truncated or changed during the merge")
        with self._lock:
            self.bytes_read += len(view)
            release = f.done(offset, offset + len(view))
        for begin, end in release:
            os.posix_fadvise(f.fd, begin, end - begin, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for f in self._files.values():
            os.close(f.fd)
        self._files.clear()


def pread_into(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from byte `offset` of the file (pread, as many calls as it takes); False where the file
    ends first. An OSError is the caller's to name."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            return False
        got += n
    return True


@dataclass
class InputFile:
    fd: int
    starts: list[int] = field(default_factory=list)  # the byte ranges done (read, or never to be read),
    ends: list[int] = field(default_factory=list)  # merged and sorted: [starts[i], ends[i]), apart

    def done(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Record the range [begin, end) as done (a finished read); the ranges to release now: the RELEASE_ALIGN
        blocks from the read's to READAHEAD_REACH past it that lie wholly inside what is done (call under the
        reader's lock). Past the read: the kernel's read-ahead brings back pages of ranges read and let go before
        (an out-of-order layout), and nothing else would let go of them again."""
        first = bisect.bisect_left(self.ends, begin)  # the ranges that overlap or touch [begin, end)
        last = bisect.bisect_right(self.starts, end)
        low = min(begin, self.starts[first]) if first < last else begin
        high = max(end, self.ends[last - 1]) if first < last else end
        self.starts[first:last], self.ends[first:last] = [low], [high]
        reach = end + READAHEAD_REACH
        ranges = []
        for start, stop in zip(self.starts[first:], self.ends[first:]):
            if start >= reach:
                break
            lo, hi = max(align_down(begin), align_up(start)), min(align_up(reach), align_down(stop))
            if hi > lo:
                ranges.append((lo, hi))
        return ranges


def planned_reads(plan: Plan) -> dict[str, list[tuple[int, int]]]:
    """Every byte range the plan reads, per file: the steps' inputs, their LoRAs' tensors, the bases of a
    LoRA output's changed parts (a scaled-fp8 input's scale is in the plan, read when its source was opened)."""
    refs = [ref for step in plan.steps for ref in step.inputs]
    refs += [ref for step in plan.steps for patch in step.patches for ref in (patch.tensor, patch.down) if ref is not None]
    refs += [base for f in plan.factors for base, changed in zip(f.bases, f.changed) if changed]
    reads: dict[str, list[tuple[int, int]]] = {}
    for ref in refs:
        for piece in ref.pieces:
            reads.setdefault(piece.file, []).append((piece.begin, piece.begin + piece.nbytes))
    return reads


def gaps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of [0, size) that `ranges` do not cover."""
    found, at = [], 0
    for begin, end in sorted(ranges):
        if begin > at:
            found.append((at, begin))
        at = max(at, end)
    return found + ([(at, size)] if size > at else [])
