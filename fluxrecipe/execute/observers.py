"""Observers: what a run learns from the values going through it, outside the kernel's arithmetic.

Each observer works in two halves: `observe` runs in a worker on a finished chunk (its inputs as read and
decoded, its values as written) and returns a partial; `fold` takes the partials in the main thread, chunk
by chunk in plan order, and puts the totals into the run's Result. Every total goes through fixed segments
(segments.py), so none depends on the chunking or the threads.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import xxhash

from ..diagnostics import Distances
from ..formats.layout import stored_bytes
from ..plan import Step
from ..segments import Segments, row_sums, split
from .kernel import ChunkIn, ChunkOut, to_float32
from .result import Result

HASH_BLOCK = 1 << 20  # bytes per block of a source tensor's content hash (XXH3-128: ~20 GB/s; sha256 cost a third of a merge)


class Observer:
    """The protocol: kinds of chunk observed, a partial per chunk (worker), folded in order (main thread)."""

    kinds: frozenset[str] = frozenset()
    reads_written: bool = False  # whether `observe` looks at the values as written (ChunkOut.written)

    def observe(self, step: Step, chunk: ChunkIn, out: ChunkOut) -> Any:
        raise NotImplementedError

    def fold(self, step: Step, partial: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Everything folded: the last totals into the result."""


class _PerTensor:
    """Per-segment results of one tensor of one source, complete once every segment is in."""

    def __init__(self) -> None:
        self.segments: dict[tuple[str, str, str], Segments] = {}  # (what, key, source) -> per-segment results

    def add(self, what: str, key: str, source: str, total: int, reduce, partial, size: int | None = None) -> Segments:
        index = (what, key, source)
        if index not in self.segments:
            self.segments[index] = Segments(total, reduce, **({"size": size} if size else {}))
        self.segments[index].add(partial)
        return self.segments[index]


class DistanceObserver(Observer):
    """Diagnostics: per output tensor and source, the squared distance of the written values to the source
    and the source's squared norm (diagnostics.Distances sums them per block)."""

    kinds = frozenset({"value"})
    reads_written = True

    def __init__(self, distances: Distances) -> None:
        self.distances = distances
        self.per_tensor = _PerTensor()
        self.scratch = threading.local()

    def observe(self, step: Step, chunk: ChunkIn, out: ChunkOut) -> list:
        written = to_float32(out.written)  # the written values, upcast only when they are compared
        if chunk.scale is not None:
            written = written.mul_(chunk.scale) if written is not out.written else written * chunk.scale
        square = self._scratch(written)
        sums = []
        for x in out.inputs:  # each square reduced (split copies what it keeps) before the scratch is reused
            distance = split(torch.sub(written, x, out=square).square_(), chunk.start, step.numel, row_sums)
            sums.append((distance, split(torch.mul(x, x, out=square), chunk.start, step.numel, row_sums)))
        return sums

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """This worker's buffer of squares, kept from chunk to chunk: a fresh one per square cost more in
        page faults than the arithmetic."""
        buffer = getattr(self.scratch, "buffer", None)
        if buffer is None or buffer.numel() < like.numel() or buffer.device != like.device:
            buffer = self.scratch.buffer = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buffer[: like.numel()]

    def fold(self, step: Step, partial: list) -> None:
        for ref, (distance, norm) in zip(step.inputs, partial):
            d = self.per_tensor.add("distance", step.key, ref.source, step.numel, row_sums, distance)
            n = self.per_tensor.add("norm", step.key, ref.source, step.numel, row_sums, norm)
            if d.complete and n.complete:
                self.distances.add(step.key, ref.source, d.fsum(), n.fsum())
                del self.per_tensor.segments[("distance", step.key, ref.source)], self.per_tensor.segments[("norm", step.key, ref.source)]


class HashObserver(Observer):
    """Content hashes of the bytes read from some sources (provenance proves what was read): per tensor, the
    XXH3-128 of its HASH_BLOCK blocks' digests; per source, the XXH3-128 of its tensors' digests by key."""

    kinds = frozenset({"value", "diff"})

    def __init__(self, sources: set[str], result: Result) -> None:
        self.sources, self.result = sources, result
        self.per_tensor = _PerTensor()
        self.hashes: dict[str, dict[str, str]] = {s: {} for s in sources}  # source -> key -> tensor digest

    def observe(self, step: Step, chunk: ChunkIn, out: ChunkOut) -> list:
        partials = []
        for raw, ref in zip(chunk.raws, step.inputs):
            if ref.source in self.sources:
                partials.append((ref.source, split(raw, stored_bytes(ref.dtype, chunk.start), ref.nbytes, _digests, HASH_BLOCK)))
        return partials

    def fold(self, step: Step, partial: list) -> None:
        for source, blocks_partial in partial:
            ref = next(t for t in step.inputs if t.source == source)
            blocks = self.per_tensor.add("hash", step.key, source, ref.nbytes, _digests, blocks_partial, HASH_BLOCK)
            if blocks.complete:
                self.hashes[source][step.key] = xxhash.xxh3_128_hexdigest(b"".join(blocks.ordered()))
                del self.per_tensor.segments[("hash", step.key, source)]

    def close(self) -> None:
        for source, digests in self.hashes.items():
            whole = xxhash.xxh3_128()
            for key in sorted(digests):
                whole.update(f"{key}\n{digests[key]}\n".encode())
            self.result.source_hashes[source] = "xxh3-128:" + whole.hexdigest()


def _digests(rows: torch.Tensor) -> list[bytes]:
    return [xxhash.xxh3_128_digest(row.numpy()) for row in rows]
