"""Runs a Plan: read, decode, compute, encode, write, with memory bounded in bytes, not in tensors.

The plan's files are written one after the other, each tensor of a file as its parts (element ranges of
canonical steps), each part in chunks of `chunk_elements`. A chunk is a unit of work: worker threads read
its elements from every input with `pread` (byte pieces: a BFL source's fused tensors are just other
offsets), decode them to float32 (times the scale, for scaled fp8), check them, apply the step's op, and
encode the result (clamped to the dtype's finite range, counted; divided by the tensor's scale for scaled
fp8; rounded once). The main thread takes finished chunks in order and appends their bytes to the file,
so each file is written front to back and hashed on the way. Work is admitted while the bytes in flight
stay under `in_flight`, which bounds memory whatever the model's size; the page cache behind every read
and write is let go as the merge moves on.

Some steps need the whole tensor first: an op's statistics passes (slerp's angle, ...) and the absmax
that sets a scaled-fp8 tensor's scale. Those run as passes of the same kind of chunks before the tensor's
values, and the chunks that need their result wait for it. Every reduction runs over fixed segments
(segments.py), so no result depends on the chunking, the threads or the order of a layout's parts.

LoRAs baked into a step (its patches) are added to the op's result in the same chunk, before the encode:
rows of W with the matching rows of up and all of down (kept decoded in a small cache while its steps run),
the product computed in fixed blocks of rows (ops/lora.py), so a patched step's chunks are whole blocks.
A merge written as a LoRA needs each matrix's whole difference to the base at once: "diff" chunks fill a
float32 buffer of one factor (the largest is the largest tensor, not the model), then a truncated SVD
factors it and its up and down are written; nothing else is held.

The executor writes only the weight files, into a folder its caller owns; config files, the card, the
manifest and the move into place belong to packaging (package/) and the writer.
"""

from __future__ import annotations

import bisect
import math
import os
import shutil
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from .diagnostics import Distances
from .errors import OutputError, SourceError, UsageError
from .formats.layout import OutTensor, Part, TensorRef, row_size, rows
from .formats.safetensors import ITEMSIZE, encode_header
from .linux import keep_freed_memory
from .loras import Factor, Patch, as_written, unwritten
from .ops import OPS, Where
from .ops.lora import ROWS, factor, product_rows, relative_error
from .options import Options
from .plan import Plan, Step, human_bytes
from .segments import Segments, row_sums, split
from .text import cut
from .writer import FileRecord, align_down, align_up, open_safetensors, rewrite_header

# safetensors dtype code -> torch dtype, and the largest finite value of each output dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
LIMITS = {code: float(torch.finfo(dtype).max) for code, dtype in DTYPES.items()}
READAHEAD_REACH = 32 << 20  # how far past a read the kernel's read-ahead may reach (2 x read_ahead_kb; 8 MB disks exist)
HASH_BLOCK = 1 << 20  # bytes per block of a source tensor's content hash (XXH3-128: ~20 GB/s; sha256 cost a third of a merge)


@dataclass
class Result:
    files: dict[str, FileRecord]  # file name -> size and sha256 (the data's, for a header written again)
    seconds: float
    bytes_read: int
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


def execute(plan: Plan, folder: Path, options: Options, metadata: dict[str, str] | None = None, header_size: int = 0, hash_sources: Collection[str] = ()) -> Result:
    """Write the plan's weight files into `folder`. `metadata` goes into every file's header (padded to
    `header_size` when given, for metadata known only at the end); the bytes read from `hash_sources` are
    hashed, so that provenance can prove what was read."""
    started = time.monotonic()
    device = check_device(options.device)
    keep_freed_memory()
    _check_free_space(folder, plan)
    result = Result(files={}, seconds=0.0, bytes_read=plan.bytes_read, bytes_written=0)
    result.distances = Distances(plan.family) if options.diagnostics else None
    _Run(plan, folder, options, device, result, metadata or {}, header_size, set(hash_sources)).run()
    result.bytes_written = sum(r.size for r in result.files.values())
    result.seconds = time.monotonic() - started
    return result


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"device={name!r}: choose cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name}: this torch ({torch.__version__}) sees no CUDA GPU; use device=cpu")
    return device


def _check_free_space(folder: Path, plan: Plan) -> None:
    need = plan.bytes_written + (1 << 20) * (len(plan.files) + 1)  # headers and side files
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(f"{folder.parent}: not enough free space: the output needs {human_bytes(need)}, {human_bytes(free)} are free")


# --- units of work -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Elements [start, stop) of a step, for one purpose: a statistics pass, an absmax pass, the values, or
    (a LoRA output) the difference to the base."""

    kind: str  # "stat", "absmax", "value" or "diff"
    step: Step
    start: int
    stop: int
    tensor: OutTensor | None = None  # absmax and value: the output tensor it is part of
    file: int = 0  # value: the index of the output file
    pass_index: int = 0  # stat: which of the op's passes
    base: TensorRef | None = None  # diff: the base's tensor
    factor: int = 0  # diff: the plan's factor it fills, from element `at` of its buffer
    at: int = 0

    @property
    def nbytes(self) -> int:
        """Memory while in flight: the raw inputs, their float32 copies and a few float32 temporaries, the output;
        for a LoRA, its rows of up (whole blocks) and their product, and its down."""
        n = self.stop - self.start
        size = n * (sum(ITEMSIZE[t.dtype] + 4 for t in self.step.inputs) + 12 + ITEMSIZE[self.step.dtype])
        if self.base is not None:
            size += n * (ITEMSIZE[self.base.dtype] + 4)
        for p in self.step.patches:
            if p.down is None:  # its values, raw and decoded
                size += n * (ITEMSIZE[p.tensor.dtype] + 4)
            else:  # the product (whole blocks of rows), the up rows it needs, raw and decoded, and the down
                rows_read = n // row_size(self.step.shape) + 2 * ROWS
                size += rows_read * row_size(self.step.shape) * 4 + rows_read * p.down.shape[0] * (ITEMSIZE[p.tensor.dtype] + 4) + p.down.numel * 4
        return size


_DRAIN = object()  # from the work generator: finish everything in flight before going on


@dataclass
class _Done:
    data: torch.Tensor | None = None  # value: the encoded bytes (uint8)
    partial: object = None  # stat: the pass's partial; absmax: the chunk's absmax
    nonfinite: dict[str, int] = field(default_factory=dict)
    clamped: int = 0
    sums: list = field(default_factory=list)  # diagnostics: per input, (distance partial, norm partial)
    hashes: list = field(default_factory=list)  # per hashed input: (source, partial of block digests)


class _Run:
    def __init__(self, plan: Plan, folder: Path, options: Options, device: torch.device, result: Result, metadata: dict[str, str], header_size: int, hash_sources: set[str]):
        self.plan, self.options, self.device, self.result = plan, options, device, result
        self.reader = _Reader(_planned_reads(plan))
        self.files = _Files(plan, folder, metadata, header_size, result)
        self.hash_sources = hash_sources
        self.stats: dict[str, tuple] = {}  # step key -> the results of its op's statistics passes
        self.folds: dict[str, object] = {}  # step key -> the statistics pass under way
        self.absmax: dict[str, float] = {}  # output tensor -> the absmax pass under way
        self.segments: dict[tuple[str, str, str], Segments] = {}  # (what, key, source) -> per-segment results
        self.hashes: dict[str, dict[str, str]] = {s: {} for s in hash_sources}  # source -> key -> tensor digest
        self.downs = _Downs(options.in_flight // 4)
        self.buffers: dict[int, torch.Tensor] = {}  # a LoRA output: factor -> its difference, being filled
        self.threads = torch.get_num_threads()
        self.progress = None

    def run(self) -> None:
        threads = self.threads
        torch.set_num_threads(1)  # the workers are the parallelism; torch's own threads would only compete
        pending: deque[tuple[_Chunk, Future]] = deque()
        in_flight = 0
        progress = self.progress = _progress(self.plan, self.options)
        try:
            with ThreadPoolExecutor(self.options.workers, thread_name_prefix="fluxrecipe") as pool:
                try:
                    for chunk in self._work():
                        while pending and (chunk is _DRAIN or in_flight + chunk.nbytes > self.options.in_flight or len(pending) >= self.options.most_items):
                            done, future = pending.popleft()
                            in_flight -= done.nbytes
                            self._finish(done, future.result(), progress)
                        if chunk is not _DRAIN:
                            pending.append((chunk, pool.submit(self._compute, chunk)))
                            in_flight += chunk.nbytes
                            self.result.peak_in_flight = max(self.result.peak_in_flight, in_flight)
                    while pending:
                        done, future = pending.popleft()
                        self._finish(done, future.result(), progress)
                except BaseException:
                    for _, future in pending:
                        future.cancel()
                    raise
            self.files.close()
            self._source_hashes()
        finally:
            self.files.abort()
            self.reader.close()
            progress.close()
            torch.set_num_threads(threads)

    # -- the order of work (main thread) --

    def _work(self) -> Iterator[_Chunk | object]:
        if self.plan.factors:
            yield from self._factor_work()
            return
        for index, file in enumerate(self.plan.files):
            for tensor in file.tensors:
                for step in self._steps_of(tensor):
                    yield from self._stat_passes(step)
                if tensor.scale_name:
                    self.absmax[tensor.name] = 0.0
                    for p in tensor.parts:
                        step = self.plan.step(p.key)
                        yield from (_Chunk("absmax", step, a, b, tensor) for a, b in self._ranges(p, step))
                    yield _DRAIN
                    self.result.scales[tensor.name] = _scale_of(self.absmax.pop(tensor.name), tensor.dtype)
                for part in tensor.parts:
                    step = self.plan.step(part.key)
                    yield from (_Chunk("value", step, a, b, tensor, index) for a, b in self._ranges(part, step))

    def _factor_work(self) -> Iterator[_Chunk | object]:
        """A merge written as a LoRA: per factor, its whole difference to the base (diff chunks into one
        buffer), then, with every chunk in, its truncated SVD; down and up go into the file in plan order."""
        for index, f in enumerate(self.plan.factors):
            self.buffers[index] = torch.zeros(f.shape, dtype=torch.float32, device=self.device)
            at = 0
            for part, base, changed in zip(f.parts, f.bases, f.changed):
                if changed:
                    step = self.plan.step(part.key)
                    yield from self._stat_passes(step)
                    yield from (_Chunk("diff", step, a, b, base=base, factor=index, at=at + a - part.start) for a, b in self._ranges(part, step))
                at += part.stop - part.start
            yield _DRAIN
            diff = self.buffers.pop(index)
            if not f.rank:
                self.result.lora_unheld[f.module] = float(diff.abs().max()) if diff.numel() else 0.0
                continue
            if not bool(diff.any()):  # exactly the base's: a LoRA would hold zeros, which change nothing
                self.result.lora_errors[f.module] = 0.0
                self.result.lora_left_out.append(f.module)
                continue
            for data in self._factor(f, diff):
                self.files.write(0, data)
                self.progress.update(data.numel())
        if len(self.result.lora_left_out) == sum(1 for f in self.plan.factors if f.rank):
            raise OutputError(f"every weight matrix of the recipe's result equals the base's ({len(self.result.lora_left_out)} matrices): the LoRA would be empty, so nothing was written")

    def _factor(self, f: Factor, diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded down and up of one factor; its relative error goes into the result. Runs while the
        workers wait, so the SVD gets torch's own threads."""
        dtype = DTYPES[next(t.dtype for t in self.plan.files[0].tensors if t.name == f.down)]
        if not math.isfinite(float(diff.sum())) and not bool(torch.isfinite(diff).all()):  # the sum first: no whole-size mask
            raise OutputError(f"'{cut(f.module)}': its difference to the base holds NaN/Inf values (from the inputs): a LoRA cannot be factored from it")
        torch.set_num_threads(self.threads)
        try:
            up, down = factor(diff, f.rank, f.exact, zlib.crc32(f.module.encode()))
            up, down = up.to(dtype), down.to(dtype)
            if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
                raise OutputError(f"'{cut(f.module)}': its LoRA factors do not fit {dtype} (values beyond its range): write the LoRA in fp32 (dtype=fp32)")
            self.result.lora_errors[f.module] = relative_error(diff, up.float(), down.float())
        finally:
            torch.set_num_threads(1)
        return down.contiguous().cpu().reshape(-1).view(torch.uint8), up.contiguous().cpu().reshape(-1).view(torch.uint8)  # flat first: a rank-1 factor is "contiguous" with any stride

    def _steps_of(self, tensor: OutTensor) -> list[Step]:
        return [self.plan.step(k) for k in dict.fromkeys(p.key for p in tensor.parts)]

    def _stat_passes(self, step: Step) -> Iterator[_Chunk | object]:
        passes = OPS[step.op].passes
        if not passes or step.key in self.stats:
            return
        self.stats[step.key] = ()
        whole = Part(step.key, 0, step.numel)
        for i, stat_pass in enumerate(passes):
            self.folds[step.key] = None
            yield from (_Chunk("stat", step, a, b, pass_index=i) for a, b in self._ranges(whole, step))
            yield _DRAIN
            self.stats[step.key] += (stat_pass.result(self.folds.pop(step.key), step.values),)

    def _ranges(self, part: Part, step: Step) -> Iterator[tuple[int, int]]:
        """The chunks of a part: chunk_elements each; for a step with a LoRA product, whole blocks of ROWS rows
        (chunk_elements rounded down to them, at least one), on the tensor's grid of blocks."""
        size = self.options.chunk_elements
        if part.stop == part.start:
            yield part.start, part.stop  # an empty tensor still opens its file
        if any(p.down is not None for p in step.patches):
            block = ROWS * row_size(step.shape)
            size = max(block, size // block * block)
            a = part.start
            while a < part.stop:
                b = min((a // size + 1) * size, part.stop)
                yield a, b
                a = b
            return
        for a in range(part.start, part.stop, size):
            yield a, min(a + size, part.stop)

    # -- a chunk's work (worker threads) --

    def _compute(self, chunk: _Chunk) -> _Done:
        step = chunk.step
        raws = [self.reader.read(ref, chunk.start, chunk.stop) for ref in step.inputs]
        xs = [self._decode(raw, ref) for raw, ref in zip(raws, step.inputs)]
        done = _Done()
        self._check_inputs(step.inputs, xs, done)  # nonfinite=error stops at the first pass that reads a NaN
        if chunk.kind == "stat":
            if done.nonfinite:  # nonfinite=warn: a NaN/Inf counts as 0 in a statistic, so it spoils its own elements only
                xs = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in xs]
            done.partial = OPS[step.op].passes[chunk.pass_index].partial(xs, _where(step, chunk), self.stats[step.key], step.values)
            return done
        if chunk.kind == "value" and step.copies_bytes:
            done.data, rounded = raws[0], xs[0]
        else:
            merged, base = self._apply(step, xs, chunk), None
            if chunk.kind == "diff":  # the difference first, then the LoRAs' changes: (op - base) + delta loses nothing to W's size
                base = self._decode(self.reader.read(chunk.base, chunk.start, chunk.stop), chunk.base)
                self._check_inputs((chunk.base,), [base], done)
                merged = merged - base
            if step.patches:
                merged = self._patch(step, merged, xs, chunk, done, base)
            if chunk.kind == "diff":
                done.data = merged
                self._hash_inputs(step, raws, chunk, done)
                return done
            if chunk.kind == "absmax":
                finite = merged[torch.isfinite(merged)]
                done.partial = float(finite.abs().max()) if finite.numel() else 0.0
                return done
            scale = self.result.scales.get(chunk.tensor.name)
            encoded, done.clamped = self._encode(step, merged, scale, done)
            done.data = encoded.cpu().view(torch.uint8)
            rounded = None
            if self.options.diagnostics:  # the written values, upcast only when they are compared
                rounded = encoded.float() if scale is None else encoded.float() * scale
        if self.options.diagnostics:
            n = step.numel
            for x in xs:
                distance = torch.nn.functional.mse_loss(rounded, x, reduction="none")
                done.sums.append((split(distance, chunk.start, n, row_sums), split(x.square(), chunk.start, n, row_sums)))
        self._hash_inputs(step, raws, chunk, done)
        return done

    def _hash_inputs(self, step: Step, raws: list[torch.Tensor], chunk: _Chunk, done: _Done) -> None:
        for raw, ref in zip(raws, step.inputs):
            if ref.source in self.hash_sources:
                size = ITEMSIZE[ref.dtype]
                done.hashes.append((ref.source, split(raw, chunk.start * size, ref.nbytes, _digests, HASH_BLOCK)))

    def _patch(self, step: Step, merged: torch.Tensor, xs: list[torch.Tensor], chunk: _Chunk, done: _Done, base: torch.Tensor | None = None) -> torch.Tensor:
        """The step's LoRAs applied to its op's result, in order, in float32, as PEFT fuses them:
        W + (up @ down) * scale for a product, W + tensor * scale for a bias, the tensor for a replacement.
        With `base` (a diff chunk: `merged` is the result minus base), a replacement is its difference to base."""
        if any(merged is x for x in xs):
            merged = merged.clone()  # `take` returns its input, which the diagnostics still compare
        width = row_size(step.shape)
        for p in step.patches:
            if p.down is None:
                values = self._lora_values(p, p.tensor, chunk.start, chunk.stop, done)
                if p.kind == "replace":
                    merged = values if base is None else values - base
                else:
                    merged = merged.add_(values.mul_(p.scale))
                continue
            first, end = chunk.start // width, -(-chunk.stop // width)
            lo, hi = first // ROWS * ROWS, min(-(-end // ROWS) * ROWS, rows(step.shape))  # whole blocks of rows
            rank = p.down.shape[0]
            up = self._lora_values(p, p.tensor, lo * rank, hi * rank, done).view(hi - lo, rank)
            delta = product_rows(up, self._down(p, done)).view(-1)
            merged.add_(delta[chunk.start - lo * width : chunk.stop - lo * width].mul_(p.scale))
        return merged

    def _down(self, p: Patch, done: _Done) -> torch.Tensor:
        down = self.downs.get(p.down)
        if down is None:
            down = self._lora_values(p, p.down, 0, p.down.numel, done).view(p.down.shape)
            self.downs.put(p.down, down)
        return down

    def _lora_values(self, p: Patch, ref: TensorRef, start: int, stop: int, done: _Done) -> torch.Tensor:
        """Elements [start, stop) of a LoRA's tensor in float32, checked for NaN/Inf as inputs are."""
        x = self._decode(self.reader.read(ref, start, stop), ref)
        self._check_finite(x, f"lora '{p.lora}'", ref, f"lora {p.lora}: {ref.file_key}", done)
        return x

    def _decode(self, raw: torch.Tensor, ref: TensorRef) -> torch.Tensor:
        x = raw.view(DTYPES[ref.dtype]).to(device=self.device, dtype=torch.float32)
        return x if ref.scale is None else x.mul_(ref.scale.value)

    def _apply(self, step: Step, xs: list[torch.Tensor], chunk: _Chunk) -> torch.Tensor:
        spec = OPS[step.op]
        kwargs = step.values
        if spec.wants("where"):
            kwargs["where"] = _where(step, chunk)
        if spec.wants("stats"):
            kwargs["stats"] = self.stats[step.key]
        return spec.call(xs, kwargs)

    def _check_inputs(self, refs: tuple[TensorRef, ...], xs: list[torch.Tensor], done: _Done) -> None:
        """NaN/Inf in an input: stop (nonfinite=error), or count it (warn). A sum over x is NaN/Inf iff x
        holds NaN/Inf, or overflows, which the exact count then clears."""
        for ref, x in zip(refs, xs):
            self._check_finite(x, f"source '{ref.source}'", ref, f"{ref.source}: {ref.key}", done)

    def _check_finite(self, x: torch.Tensor, owner: str, ref: TensorRef, counted_as: str, done: _Done) -> None:
        """One input read (`owner`: its source or LoRA): NaN/Inf stops the merge, or is counted as `counted_as`."""
        if math.isfinite(float(x.sum())):
            return
        bad = int(x.numel() - torch.isfinite(x).sum())
        if bad and self.options.nonfinite == "error":
            raise SourceError(f"{owner}: tensor '{cut(ref.file_key)}' ({ref.file}) holds NaN or Inf values; merge anyway with nonfinite=warn (they are counted and reported)")
        if bad:
            done.nonfinite[counted_as] = bad

    def _encode(self, step: Step, merged: torch.Tensor, scale: float | None, done: _Done) -> tuple[torch.Tensor, int]:
        """The result in the output dtype: NaN/Inf of finite inputs stopped or counted, values beyond the
        dtype's finite range clamped and counted, divided by the scale for scaled fp8, rounded once."""
        x = merged if scale is None else merged / scale
        low, high = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(low) and math.isfinite(high)):
            self._nonfinite_result(step, x, done)
            finite = x[torch.isfinite(x)]
            low, high = (float(v) for v in torch.aminmax(finite)) if finite.numel() else (0.0, 0.0)
        limit, clamped = LIMITS[step.dtype], 0
        if low < -limit or high > limit:
            if scale is None:  # a scaled tensor fits by construction, up to one rounding of the division
                clamped = int(((x < -limit) | (x > limit)).sum())
            x = x.clamp(-limit, limit)
        return x.to(DTYPES[step.dtype]), clamped

    def _nonfinite_result(self, step: Step, x: torch.Tensor, done: _Done) -> None:
        """NaN/Inf in a result: expected where an input held some (already counted); from finite inputs, the
        op's float32 arithmetic overflowed: stop (nonfinite=error) or count it (warn)."""
        if done.nonfinite:
            return
        bad = int(x.numel() - torch.isfinite(x).sum())
        if self.options.nonfinite == "error":
            rule = self.plan.recipe.rules[step.rule]
            raise OutputError(
                f"'{cut(step.key)}' ({rule.describe()}) comes out with {bad} NaN/Inf values from finite inputs (float32 overflow): "
                "check the op's parameters, or merge anyway with nonfinite=warn (they are counted and reported)"
            )
        done.nonfinite[f"output: {step.key}"] = bad

    # -- folding finished chunks in (main thread, in order) --

    def _finish(self, chunk: _Chunk, done: _Done, progress) -> None:
        step = chunk.step
        if chunk.kind == "stat":
            self.folds[step.key] = OPS[step.op].passes[chunk.pass_index].fold(self.folds[step.key], done.partial)
            return
        if chunk.kind == "absmax":
            self.absmax[chunk.tensor.name] = max(self.absmax[chunk.tensor.name], done.partial)
            return
        for name, count in done.nonfinite.items():
            self.result.nonfinite[name] = self.result.nonfinite.get(name, 0) + count
        if done.clamped:
            self.result.clamped[chunk.tensor.name] = self.result.clamped.get(chunk.tensor.name, 0) + done.clamped
        for ref, (distance, norm) in zip(step.inputs, done.sums):
            d = self._segments("distance", step, ref.source, step.numel, row_sums, distance)
            n = self._segments("norm", step, ref.source, step.numel, row_sums, norm)
            if d.complete and n.complete:
                self.result.distances.add(step.key, ref.source, d.fsum(), n.fsum())
                del self.segments[("distance", step.key, ref.source)], self.segments[("norm", step.key, ref.source)]
        for source, partial in done.hashes:
            ref = next(t for t in step.inputs if t.source == source)
            blocks = self._segments("hash", step, source, ref.nbytes, _digests, partial, HASH_BLOCK)
            if blocks.complete:
                self.hashes[source][step.key] = xxhash.xxh3_128_hexdigest(b"".join(blocks.ordered()))
                del self.segments[("hash", step.key, source)]
        if chunk.kind == "diff":
            self.buffers[chunk.factor].view(-1)[chunk.at : chunk.at + chunk.stop - chunk.start] = done.data
            return
        self.files.write(chunk.file, done.data)
        progress.update(done.data.numel())

    def _segments(self, what: str, step: Step, source: str, total: int, reduce, partial, size: int | None = None) -> Segments:
        key = (what, step.key, source)
        if key not in self.segments:
            self.segments[key] = Segments(total, reduce, **({"size": size} if size else {}))
        self.segments[key].add(partial)
        return self.segments[key]

    def _source_hashes(self) -> None:
        for source, digests in self.hashes.items():
            whole = xxhash.xxh3_128()
            for key in sorted(digests):
                whole.update(f"{key}\n{digests[key]}\n".encode())
            self.result.source_hashes[source] = "xxh3-128:" + whole.hexdigest()


def _where(step: Step, chunk: _Chunk) -> Where:
    return Where(step.key, chunk.start, chunk.stop, tuple(t.source for t in step.inputs), step.numel)


class _Downs:
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


def _digests(rows: torch.Tensor) -> list[bytes]:
    return [xxhash.xxh3_128_digest(row.numpy()) for row in rows]


def _scale_of(absmax: float, dtype: str) -> float:
    """Scaled fp8's per-tensor scale: absmax / the dtype's largest value, in float32 (1 where that is 0: a zero
    tensor, or one so small that the division underflows, whose values then round to 0 as they would anyway)."""
    scale = float(torch.tensor(absmax, dtype=torch.float32) / LIMITS[dtype])
    return scale if scale > 0.0 else 1.0


# --- the output files ------------------------------------------------------------------------------------


class _Files:
    """The plan's files, opened one after the other as the chunks arrive in plan order; each file's scales
    and constants follow its tensors. A LoRA output may leave matrices out (result.lora_left_out): its
    header is written with room (the header size given, else the whole plan's), and written again at the
    end, listing only what the file holds."""

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
        left_out = self.result.lora_left_out
        unwritten_names = unwritten(self.plan.factors, left_out)
        for constant in out.constants:
            if constant.name not in unwritten_names:
                self.file.write(constant.data)
        header = self.file.unhashed
        if left_out:
            entries, own = as_written(out, self.plan.format, self.plan.factors, self.plan.lora_rank, left_out)
            self.file.expected_size = header + sum(math.prod(shape) * ITEMSIZE[dtype] for _, dtype, shape in entries)
        self.result.files[out.name] = self.file.close()
        self.file = None
        if left_out:
            rewrite_header(self.folder / out.name, entries, {**self.metadata, **dict(out.metadata), **own}, header)

    def close(self) -> None:
        self._close_current()

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None


# --- reading -------------------------------------------------------------------------------------------


class _Reader:
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
        self._files: dict[str, _InputFile] = {}
        self._lock = threading.Lock()

    def _file(self, path: str) -> "_InputFile":
        with self._lock:
            if path not in self._files:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise SourceError(f"{path}: cannot open: {e.strerror}") from None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._files[path] = _InputFile(fd)
                for begin, end in _gaps(self._planned.get(path, []), os.fstat(fd).st_size):
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
        got = 0
        try:
            while got < len(view):
                n = os.preadv(f.fd, [view[got:]], offset + got)
                if n == 0:
                    raise SourceError(f"{path}: the file ended while reading '{cut(what)}': it was truncated or changed during the merge")
                got += n
        except OSError as e:
            raise SourceError(f"{path}: reading '{cut(what)}' failed: {e.strerror}") from None
        with self._lock:
            release = f.done(offset, offset + len(view))
        for begin, end in release:
            os.posix_fadvise(f.fd, begin, end - begin, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for f in self._files.values():
            os.close(f.fd)
        self._files.clear()


@dataclass
class _InputFile:
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


def _planned_reads(plan: Plan) -> dict[str, list[tuple[int, int]]]:
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


def _gaps(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The parts of [0, size) that `ranges` do not cover."""
    gaps, at = [], 0
    for begin, end in sorted(ranges):
        if begin > at:
            gaps.append((at, begin))
        at = max(at, end)
    return gaps + ([(at, size)] if size > at else [])


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
