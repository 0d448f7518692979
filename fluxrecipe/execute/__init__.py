"""Runs a Plan: read, decode, compute, encode, write, with memory bounded in bytes, not in tensors.

The parts, each its own module:
- reader.py: `pread` of byte pieces from the sources, the page cache let go behind every read;
- kernel.py: one chunk of inputs -> its result (decode -> op -> LoRA patches -> NaN/Inf checks -> encode),
  a pure function of tensors and the step;
- scheduler.py: chunks computed by worker threads under the byte budget, finished in order;
- observers.py: diagnostics and content hashes, gathered from the chunks outside the kernel;
- sink.py: where the encoded bytes go (safetensors files, or the tensors in memory: InMemory);
- executor.py: the order of a run's work; factoring.py: the work of a merge written as a LoRA.

Every reduction runs over fixed segments (segments.py), so no result depends on the chunking, the threads
or the order of a layout's parts. The executor writes only the weight files, into a folder its caller owns;
config files, the card, the manifest and the move into place belong to packaging (package/) and the writer.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path

import torch

from ..diagnostics import Distances
from ..errors import OutputError, UsageError
from ..linux import keep_freed_memory
from ..options import Options
from ..plan import Plan, human_bytes
from .executor import Executor
from .gguf_sink import GGUFFile
from .result import Result
from .sink import InMemory, SafetensorsFiles, Sink

__all__ = ["InMemory", "Result", "Sink", "check_device", "execute"]


def execute(
    plan: Plan, folder: Path | None, options: Options, metadata: dict[str, str] | None = None, header_size: int = 0,
    hash_sources: Collection[str] = (), sink: Callable[[Result], Sink] | None = None,
) -> Result:
    """Write the plan's weight files into `folder` (or hand their bytes to the sink that `sink` makes for the
    run's Result, where its records go). `metadata` goes into every
    file's header (padded to `header_size` when given, for metadata known only at the end); the bytes read
    from `hash_sources` are hashed, so that provenance can prove what was read."""
    started = time.monotonic()
    device = check_device(options.device)
    keep_freed_memory()
    result = Result(files={}, seconds=0.0, bytes_read=plan.bytes_read, bytes_written=0)
    if sink is None:
        _check_free_space(folder, plan)
        made = (GGUFFile if plan.format == "gguf" else SafetensorsFiles)(plan, folder, metadata or {}, header_size, result)
    else:
        made = sink(result)
    # a single file carries no diagnostics (package writes diagnostics.json beside a folder's shards only)
    result.distances = Distances(plan.family) if options.diagnostics and not plan.single_file else None
    Executor(plan, options, device, result, made, set(hash_sources), folder).run()
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
