"""Runs a Plan: read, compute, write, with memory that does not grow with the model.

Every output tensor is cut into chunks of a fixed number of elements (all ops are element-wise, and a run
of elements is a contiguous byte range in every input). Worker threads read a chunk of each input with
`pread`, check it, compute it in float32 and round it once; the main thread writes the finished chunks in
order, so each shard is written front to back and hashed on the way. At most `window` chunks are in flight,
which bounds the memory; the page cache behind every read and write is let go as the merge moves on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import __version__
from .card import model_card
from .diagnostics import SEGMENT, Distances
from .errors import OutputError, SourceError, UsageError
from .linux import keep_freed_memory
from .ops import OPS
from .options import Options
from .plan import INDEX_NAME, Plan, Step, human_bytes
from .sources import TensorLoc
from .st_format import ITEMSIZE
from .writer import MANIFEST_NAME, FileRecord, align_down, atomic_folder, open_shard, write_file, write_index, write_json

PROVENANCE_NAME = "fluxrecipe.json"
RECIPE_NAME = "recipe.yaml"
DIAGNOSTICS_NAME = "diagnostics.json"
CARD_NAME = "README.md"


# safetensors dtype code -> torch dtype (st_format.ITEMSIZE lists the codes fluxrecipe reads)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass
class Result:
    output: Path
    files: dict[str, FileRecord]
    seconds: float
    bytes_read: int
    bytes_written: int
    nonfinite: dict[str, int] = field(default_factory=dict)  # "source: key" -> count of NaN/Inf values
    nonfinite_outputs: dict[str, int] = field(default_factory=dict)  # output key -> count of NaN/Inf values written
    distances: Distances | None = None
    peak_in_flight: int = 0


@dataclass(frozen=True)
class _Chunk:
    shard: int
    step: Step
    start: int  # element range of the step's tensor
    stop: int


@dataclass
class _Done:
    data: torch.Tensor  # the output bytes of the chunk (uint8)
    sums: list[tuple[list[float], list[float]]]  # per input, per segment: ||merged - input||^2, ||input||^2 (diagnostics)
    nonfinite: list[int]  # per input
    nonfinite_output: int = 0  # NaN/Inf values in the rounded result


def execute(plan: Plan, output: Path, options: Options) -> Result:
    """Write the merged model to `output` (atomically); returns what was written and measured."""
    started = time.monotonic()
    _check_device(options.device)
    keep_freed_memory()
    recorded = as_recorded(plan, Path(output))
    with atomic_folder(output, options.overwrite) as tmp:
        _check_free_space(tmp, plan)
        result = Result(output=Path(output), files={}, seconds=0.0, bytes_read=plan.bytes_read, bytes_written=0)
        result.distances = Distances() if options.diagnostics else None
        _write_shards(recorded, tmp, options, result)
        _write_side_files(recorded, tmp, result)
        result.bytes_written = sum(r.size for r in result.files.values())
    result.seconds = time.monotonic() - started
    return result


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"device={device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={device}: this torch ({torch.__version__}) sees no CUDA GPU; use device=cpu")


def _check_free_space(folder: Path, plan: Plan) -> None:
    need = plan.bytes_written + (1 << 20) * (len(plan.shards) + 1)  # headers and side files
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(f"{folder.parent}: not enough free space: the output needs {human_bytes(need)}, {human_bytes(free)} are free")


def _write_shards(plan: Plan, folder: Path, options: Options, result: Result) -> None:
    chunks = (
        _Chunk(i, step, start, min(start + options.chunk, math.prod(step.shape)))
        for i, shard in enumerate(plan.shards)
        for step in shard.steps
        for start in range(0, max(math.prod(step.shape), 1), options.chunk)
    )
    sink = _Shards(plan, folder, result)
    reader = _Reader()
    device = torch.device(options.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers are the parallelism; torch's own threads would only compete
    pending: deque[tuple[_Chunk, Future]] = deque()
    progress = _progress(plan, options)
    try:
        with ThreadPoolExecutor(options.workers, thread_name_prefix="fluxrecipe") as pool:
            try:
                for chunk in chunks:
                    while len(pending) >= options.window:
                        _finish(*pending.popleft(), sink, result, progress)
                    pending.append((chunk, pool.submit(_compute, chunk, reader, device, options)))
                    result.peak_in_flight = max(result.peak_in_flight, len(pending))
                while pending:
                    _finish(*pending.popleft(), sink, result, progress)
            except BaseException:
                for _, future in pending:
                    future.cancel()
                raise
        sink.close()
    finally:
        sink.abort()
        reader.close()
        progress.close()
        torch.set_num_threads(threads)


class _Shards:
    """The shard files, opened one after the other as the chunks arrive in plan order."""

    def __init__(self, plan: Plan, folder: Path, result: Result):
        self.plan, self.folder, self.result = plan, folder, result
        self.metadata = {"format": "pt", "fluxrecipe.version": __version__, "fluxrecipe.recipe": json.dumps(pinned_recipe(plan), separators=(",", ":"))}
        self.index, self.file = -1, None

    def write(self, shard: int, data: torch.Tensor) -> None:
        if shard != self.index:
            self.close()
            steps = self.plan.shards[shard].steps
            self.index = shard
            self.file = open_shard(self.folder / self.plan.shards[shard].file, [(s.key, s.dtype, s.shape) for s in steps], self.metadata)
        self.file.write(data.numpy())

    def close(self) -> None:
        if self.file is not None:
            self.result.files[self.plan.shards[self.index].file] = self.file.close()
            self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None


def _finish(chunk: _Chunk, future: Future, sink: _Shards, result: Result, progress) -> None:
    """Write one finished chunk (in plan order), and fold its checks and sums into the result."""
    done: _Done = future.result()
    step = chunk.step
    for loc, bad in zip(step.inputs, done.nonfinite):
        if bad:
            name = f"{loc.source}: {loc.key}"
            result.nonfinite[name] = result.nonfinite.get(name, 0) + bad
    if done.nonfinite_output:
        result.nonfinite_outputs[step.key] = result.nonfinite_outputs.get(step.key, 0) + done.nonfinite_output
    last = chunk.stop >= math.prod(step.shape)
    for loc, (distances, norms) in zip(step.inputs, done.sums):
        result.distances.add(step.key, loc.source, distances, norms, last)
    sink.write(chunk.shard, done.data)
    progress.update(done.data.numel())


def _compute(chunk: _Chunk, reader: "_Reader", device: torch.device, options: Options) -> _Done:
    """Read a chunk of every input, check it, merge it in float32, round it once to the output dtype."""
    step = chunk.step
    raws = [reader.read(loc, chunk.start, chunk.stop) for loc in step.inputs]
    xs = [raw.view(DTYPES[loc.dtype]).to(device=device, dtype=torch.float32) for raw, loc in zip(raws, step.inputs)]
    # A sum over x is NaN/Inf iff x holds NaN/Inf (or overflows, which the exact count below then clears): the
    # diagnostics' squared norms serve, and without them a plain sum is the cheapest check.
    norms = [_squares_per_segment(x) if options.diagnostics else [float(x.sum())] for x in xs]
    nonfinite = [0 if math.isfinite(sum(n)) else int(x.numel() - torch.isfinite(x).sum()) for n, x in zip(norms, xs)]
    if options.nonfinite == "error" and any(nonfinite):
        loc = step.inputs[next(i for i, n in enumerate(nonfinite) if n)]
        raise SourceError(
            f"source '{loc.source}': tensor '{loc.key}' ({loc.file}) holds NaN or Inf values; "
            "merge anyway with nonfinite=warn (they are counted and reported)"
        )
    bad_output = 0
    if step.copies_bytes:  # the input's own bytes: checked above
        data, distances = raws[0], [[0.0] * len(norms[0])]
    else:
        exact = OPS[step.op.name].fn(xs, step.op.args)
        merged = exact.to(DTYPES[step.dtype])
        bad_output = int(merged.numel() - torch.isfinite(merged).sum())
        if bad_output and options.nonfinite == "error":
            raise OutputError(_nonfinite_output(step, bad_output, bool(torch.isfinite(exact).all())))
        data = merged.cpu().view(torch.uint8)
        distances = []
        if options.diagnostics:  # upcast the rounded result once, and only when it is compared
            as_float = merged.float()
            distances = [_squares_per_segment(as_float, x) for x in xs]
    return _Done(data, list(zip(distances, norms)) if options.diagnostics else [], nonfinite, bad_output)


DTYPE_MAX = {"F16": "65504", "BF16": "3.39e38", "F32": "3.40e38"}


def _nonfinite_output(step: Step, count: int, exact_finite: bool) -> str:
    """Why a merge of finite inputs has NaN/Inf in its output: the float32 result overflowed the output dtype,
    or the float32 arithmetic itself overflowed."""
    why = (
        f"the float32 result exceeds {step.dtype}'s range (largest value {DTYPE_MAX[step.dtype]}): choose a wider dtype (bf16 or fp32)"
        if exact_finite
        else "the float32 arithmetic itself overflows"
    )
    return (
        f"tensor '{step.key}': rules[{step.rule}] ({step.op}) of finite inputs gives {count} Inf/NaN value(s) in this chunk: {why}; "
        "merge anyway with nonfinite=warn (they are counted and reported)"
    )


def _squares_per_segment(a: torch.Tensor, b: torch.Tensor | None = None) -> list[float]:
    """Per run of SEGMENT elements (the tensor's last run may be shorter): the sum of (a - b)^2, or of a^2
    without b, in float32. mse_loss computes the difference and its square in one pass."""
    whole = a.numel() - a.numel() % SEGMENT
    sums: list[float] = []
    for start, stop, width in ((0, whole, SEGMENT), (whole, a.numel(), a.numel() - whole)):
        if stop > start:
            rows = a[start:stop].view(-1, width)
            squares = rows.square() if b is None else torch.nn.functional.mse_loss(rows, b[start:stop].view(-1, width), reduction="none")
            sums += squares.sum(1).tolist()
    return sums


class _Reader:
    """pread of byte ranges, from file descriptors shared by the workers; consumed pages are let go.

    Releasing each chunk's own (unaligned) range would keep about half of every file cached (see
    writer.RELEASE_ALIGN), so each file is released behind a frontier: up to the oldest read still in flight,
    rounded down to RELEASE_ALIGN. A read that reaches behind the frontier (it began before the frontier moved
    past it, or its source's layout differs from the base's) releases everything behind the frontier again.
    """

    def __init__(self) -> None:
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
            return self._files[path]

    def read(self, loc: TensorLoc, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the tensor at `loc`, as raw bytes."""
        size = ITEMSIZE[loc.dtype]
        offset, nbytes = loc.begin + start * size, (stop - start) * size
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        f = self._file(loc.file)
        with self._lock:
            f.in_flight[offset] = f.in_flight.get(offset, 0) + 1
        got = 0
        try:
            while got < nbytes:
                n = os.preadv(f.fd, [view[got:]], offset + got)
                if n == 0:
                    raise SourceError(f"{loc.file}: the file ended while reading '{loc.key}': it was truncated or changed during the merge")
                got += n
        except OSError as e:
            raise SourceError(f"{loc.file}: reading '{loc.key}' failed: {e.strerror}") from None
        finally:
            with self._lock:
                release = f.done(offset, offset + nbytes)
            for start, stop in release:
                os.posix_fadvise(f.fd, start, stop - start, os.POSIX_FADV_DONTNEED)
        return buf

    def close(self) -> None:
        for f in self._files.values():
            os.close(f.fd)
        self._files.clear()


@dataclass
class _InputFile:
    fd: int
    in_flight: dict[int, int] = field(default_factory=dict)  # start offset -> reads from there under way
    released: int = 0  # everything before this offset has been let go

    def done(self, begin: int, end: int) -> list[tuple[int, int]]:
        """Mark a read finished; the byte ranges to release now (call under the reader's lock)."""
        if self.in_flight[begin] == 1:
            del self.in_flight[begin]
        else:
            self.in_flight[begin] -= 1
        ranges = []
        if begin < self.released:  # the read reached behind the frontier (it began before the frontier passed)
            ranges.append((align_down(begin), self.released))
        frontier = align_down(min(self.in_flight, default=end))
        if frontier > self.released:
            ranges.append((self.released, frontier))
            self.released = frontier
        return ranges


def _progress(plan: Plan, options: Options):
    from tqdm import tqdm

    return tqdm(
        total=sum(s.nbytes for s in plan.steps),
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=None if options.progress else True,  # None: only on a terminal
        dynamic_ncols=True,
    )


def as_recorded(plan: Plan, output: Path) -> Plan:
    """The plan as the output's files record it: an output is shared, so no absolute local path goes into it.
    A local source is named by its path relative to the output folder (where its recipe.yaml lies, so that
    recipe.yaml replays from anywhere: see sources.py); hub sources by repo and commit, demo ones by name."""
    sources = []
    for s in plan.sources:
        if "path" in s.origin:
            relative = os.path.relpath(s.origin["path"], os.path.abspath(output))
            s = dataclasses.replace(s, spec=relative, origin={**s.origin, "path": relative}, folder=relative)
        sources.append(s)
    recipe = dataclasses.replace(plan.recipe, file=os.path.basename(plan.recipe.file) if plan.recipe.file else None)
    return dataclasses.replace(plan, recipe=recipe, sources=tuple(sources))


def pinned_recipe(plan: Plan) -> dict:
    """The recipe as composed (overrides applied, ${recipe.alpha} kept, so a replay can override it again)
    with every source pinned to what was read: a hub commit, a path, a demo name."""
    recipe = dict(plan.recipe.written)
    recipe["sources"] = {s.name: _pin(s.origin) for s in plan.sources}
    return recipe


def _pin(origin: dict[str, str]) -> dict[str, str]:
    if "repo" in origin:
        return {"repo": origin["repo"], "revision": origin["commit"]} | ({"subfolder": origin["subfolder"]} if "subfolder" in origin else {})
    return {k: v for k, v in origin.items() if k in ("path", "subfolder", "demo")}


def _write_side_files(plan: Plan, folder: Path, result: Result) -> None:
    files = result.files
    weight_map = {s.key: shard.file for shard in plan.shards for s in shard.steps}
    files["config.json"] = write_json(folder / "config.json", plan.config)
    files[INDEX_NAME] = write_index(folder / INDEX_NAME, weight_map, plan.bytes_written)
    files[RECIPE_NAME] = write_file(folder / RECIPE_NAME, yaml.safe_dump(pinned_recipe(plan), sort_keys=False, allow_unicode=True).encode())
    files[PROVENANCE_NAME] = write_json(folder / PROVENANCE_NAME, _provenance(plan, result))
    files[CARD_NAME] = write_file(folder / CARD_NAME, model_card(plan).encode())
    if result.distances is not None:
        files[DIAGNOSTICS_NAME] = write_json(
            folder / DIAGNOSTICS_NAME,
            {"metric": "relative L2 distance of the merged tensors to each source", "overall": result.distances.overall(), "blocks": result.distances.relative()},
        )
    manifest = {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(files.items())}
    files[MANIFEST_NAME] = write_json(folder / MANIFEST_NAME, {"fluxrecipe": __version__, "files": manifest})


def _provenance(plan: Plan, result: Result) -> dict:
    """What was merged from what, by which recipe: enough to explain and rebuild the output. No times, no hosts."""
    return {
        "fluxrecipe": __version__,
        "recipe": plan.recipe.name,
        "recipe_file": plan.recipe.file,
        "sources": {s.name: {"spec": s.spec, **s.origin} for s in plan.sources},
        "base": plan.recipe.base,
        "rules": [{"match": r.match, "op": str(r.op), "sources": list(r.sources)} for r in plan.recipe.rules],
        "dtype": plan.recipe.dtype,
        "tensors": len(plan.steps),
        "dropped": [{"key": d.key, "reason": d.reason} for d in plan.dropped],
        "notes": list(plan.notes),
        "nonfinite_inputs": result.nonfinite,
        "nonfinite_outputs": result.nonfinite_outputs,
    }
