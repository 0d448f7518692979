"""One run of a plan: the order of the work, a chunk's reads, and the folding of finished chunks.

The plan's files are written one after the other, each tensor of a file as its parts (element ranges of
canonical steps), each part in chunks of `chunk_elements`. Worker threads read a chunk's bytes (reader.py)
and turn them into encoded bytes (kernel.py); the main thread takes finished chunks in order
(scheduler.py), folds what the observers saw (observers.py) and hands the bytes to the sink (sink.py).

Some steps need the whole tensor first: an op's statistics passes (slerp's angle, ...) and the absmax
that sets a scaled-fp8 tensor's scale. Those run as passes of the same kind of chunks before the tensor's
values, and the chunks that need their result wait for it. A merge written as a LoRA is another kind of
work (factoring.py): per matrix, its whole difference to the base, then its factors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch

from ..formats.layout import OutTensor, Part, TensorRef
from ..ops import OPS
from ..options import Options
from ..plan import Plan, Step
from .factoring import Factoring
from .kernel import Checks, ChunkIn, ChunkOut, LoraChunk, compute, patch_rows, scale_of
from .observers import DistanceObserver, HashObserver, Observer
from .reader import Reader, planned_reads
from .result import Result
from .scheduler import DRAIN, Chunk, ranges, run_in_order
from .sink import Sink


class Executor:
    def __init__(self, plan: Plan, options: Options, device: torch.device, result: Result, sink: Sink, hash_sources: set[str], scratch: Path | None = None):
        self.plan, self.options, self.device, self.result, self.sink, self.scratch = plan, options, device, result, sink, scratch
        self.reader = Reader(planned_reads(plan))
        self.observers: list[Observer] = []
        if result.distances is not None:
            self.observers.append(DistanceObserver(result.distances))
        if hash_sources:
            self.observers.append(HashObserver(hash_sources, result))
        self.written_observed = any(o.reads_written for o in self.observers)
        self.stats: dict[str, tuple] = {}  # step key -> the results of its op's statistics passes
        self.folds: dict[str, object] = {}  # step key -> the statistics pass under way
        self.absmax: dict[str, float] = {}  # output tensor -> the absmax pass under way
        self.downs = DownCache(options.in_flight // 4)
        self.rule_texts = {step.rule: plan.recipe.rules[step.rule].describe() for step in plan.steps}  # for messages
        self.threads = torch.get_num_threads()
        self.progress = None
        self.factoring: Factoring | None = None  # a merge written as a LoRA: its work, in place of values

    def run(self) -> None:
        threads = self.threads
        torch.set_num_threads(1)  # the workers are the parallelism; torch's own threads would only compete
        self.progress = _progress(self.plan, self.options)
        if self.plan.factors:
            self.factoring = Factoring(self.plan, self.result, self.device, threads, self.stat_passes, self.ranges, self.sink, self.progress, self.scratch)
        try:
            work = self.factoring.chunks() if self.factoring else self.values()
            peak = run_in_order(work, self.compute, self.finish, self.options.workers, self.options.in_flight, self.options.most_items)
            self.result.peak_in_flight = max(self.result.peak_in_flight, peak)
            self.result.bytes_read = self.reader.bytes_read
            self.sink.close()
            for observer in self.observers:
                observer.close()
        finally:
            self.sink.abort()
            self.reader.close()
            self.progress.close()
            torch.set_num_threads(threads)

    # -- the order of work (main thread) --

    def values(self) -> Iterator[Chunk | object]:
        """The work of an ordinary output: per file, per tensor, its steps' statistics passes, a scaled-fp8
        tensor's absmax pass, then its values, written in order."""
        for index, file in enumerate(self.plan.files):
            for tensor in file.tensors:
                for step in self._steps_of(tensor):
                    yield from self.stat_passes(step)
                if tensor.scale_name:
                    self.absmax[tensor.name] = 0.0
                    for p in tensor.parts:
                        step = self.plan.step(p.key)
                        yield from (Chunk("absmax", step, a, b, tensor) for a, b in self.ranges(p, step))
                    yield DRAIN
                    self.result.scales[tensor.name] = scale_of(self.absmax.pop(tensor.name), tensor.dtype)
                for part in tensor.parts:
                    step = self.plan.step(part.key)
                    yield from (Chunk("value", step, a, b, tensor, index) for a, b in self.ranges(part, step))

    def stat_passes(self, step: Step) -> Iterator[Chunk | object]:
        """The chunks of the step's statistics passes that are needed, each drained before the next (once per step)."""
        passes = OPS[step.op].passes
        if not passes or step.key in self.stats:
            return
        self.stats[step.key] = ()
        whole = Part(step.key, 0, step.numel)
        for i, stat_pass in enumerate(passes):
            if stat_pass.needed is not None and not stat_pass.needed(self.stats[step.key]):
                continue
            self.folds[step.key] = None
            yield from (Chunk("stat", step, a, b, pass_index=i) for a, b in self.ranges(whole, step))
            yield DRAIN
            self.stats[step.key] += (stat_pass.result(self.folds.pop(step.key), step.values),)

    def ranges(self, part: Part, step: Step) -> Iterator[tuple[int, int]]:
        return ranges(part, step, self.options.chunk_elements)

    def _steps_of(self, tensor: OutTensor) -> list[Step]:
        return [self.plan.step(k) for k in dict.fromkeys(p.key for p in tensor.parts)]

    # -- a chunk's work (worker threads) --

    def compute(self, chunk: Chunk) -> tuple[ChunkOut, list]:
        step = chunk.step
        read = self.read(chunk)
        out = compute(step, read, Checks(self.device, self.options.nonfinite, self.rule_texts[step.rule], self.written_observed))
        for ref, down in out.downs:
            self.downs.put(ref, down)
        seen = [observer.observe(step, read, out) if chunk.kind in observer.kinds else None for observer in self.observers]
        out.inputs, out.written = [], None  # observed: a chunk waiting for its turn holds only its bytes
        return out, seen

    def read(self, chunk: Chunk) -> ChunkIn:
        """The raw bytes a chunk needs: its inputs' elements, its LoRAs' (a down from the cache when it is
        there), and (diff) the base's."""
        step, start, stop = chunk.step, chunk.start, chunk.stop
        raws = [self.reader.read(ref, start, stop) for ref in step.inputs]
        loras = []
        if chunk.kind != "stat" and not (chunk.kind == "value" and step.copies_bytes):
            for p in step.patches:
                if p.down is None:
                    loras.append(LoraChunk(self.reader.read(p.tensor, start, stop)))
                    continue
                lo, hi = patch_rows(step, start, stop)
                rank = p.down.shape[0]
                down = self.downs.get(p.down)
                down_raw = self.reader.read(p.down, 0, p.down.numel) if down is None else None
                loras.append(LoraChunk(self.reader.read(p.tensor, lo * rank, hi * rank), down, down_raw))
        base = self.reader.read(chunk.base, start, stop) if chunk.base is not None else None
        scale = self.result.scales.get(chunk.tensor.name) if chunk.kind == "value" else None
        return ChunkIn(chunk.kind, start, stop, raws, loras, base, chunk.base, self.stats.get(step.key, ()), chunk.pass_index, scale)

    # -- folding finished chunks in (main thread, in order) --

    def finish(self, chunk: Chunk, done: tuple[ChunkOut, list]) -> None:
        out, seen = done
        step = chunk.step
        if chunk.kind == "stat":
            self.folds[step.key] = OPS[step.op].passes[chunk.pass_index].fold(self.folds[step.key], out.partial)
            return
        if chunk.kind == "absmax":
            self.absmax[chunk.tensor.name] = max(self.absmax[chunk.tensor.name], out.partial)
            return
        for name, count in out.nonfinite.items():
            self.result.nonfinite[name] = self.result.nonfinite.get(name, 0) + count
        if out.clamped:
            self.result.clamped[chunk.tensor.name] = self.result.clamped.get(chunk.tensor.name, 0) + out.clamped
        for observer, partial in zip(self.observers, seen):
            if partial is not None:
                observer.fold(step, partial)
        if chunk.kind == "diff":
            self.factoring.finish(chunk, out)
            return
        self.sink.write(chunk.file, out.data)
        self.progress.update(out.data.numel())


class DownCache:
    """The decoded down matrices of the LoRAs in use (float32), shared by the chunks and steps that need one
    (a fused module's down serves q, k and v): the least recently used go past `limit` bytes."""

    def __init__(self, limit: int):
        self.limit, self.size = limit, 0
        self._items: OrderedDict[TensorRef, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: TensorRef) -> torch.Tensor | None:
        with self._lock:
            if ref in self._items:
                self._items.move_to_end(ref)
            return self._items.get(ref)

    def put(self, ref: TensorRef, value: torch.Tensor) -> None:
        nbytes = value.numel() * 4
        with self._lock:
            if ref in self._items or nbytes > self.limit:
                return
            self._items[ref] = value
            self.size += nbytes
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= old.numel() * 4


def _progress(plan: Plan, options: Options):
    from tqdm import tqdm

    return tqdm(
        total=plan.bytes_written,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=None if options.progress else True,  # None: only on a terminal
        dynamic_ncols=True,
    )
