"""Work under a byte budget, finished in order: chunks are computed by worker threads while the bytes in
flight stay under `in_flight` (and at most `most_items` chunks wait), and the main thread takes them back in
the order they were given, so that files are written front to back and every fold sees its chunks in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..formats.gguf import BLOCK_TYPES
from ..formats.layout import OutTensor, Part, TensorRef, row_size
from ..formats.safetensors import ITEMSIZE
from ..ops.lora import ROWS
from ..plan import Step

DRAIN = object()  # from a work generator: finish everything in flight before going on


@dataclass(frozen=True)
class Chunk:
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
        size = n * (sum(_itemsize(t.dtype) + 4 for t in self.step.inputs) + 12 + _itemsize(self.step.dtype))
        if self.base is not None:
            size += n * (_itemsize(self.base.dtype) + 4)
        for p in self.step.patches:
            if p.down is None:  # its values, raw and decoded
                size += n * (ITEMSIZE[p.tensor.dtype] + 4)
            else:  # the product (whole blocks of rows), the up rows it needs, raw and decoded, and the down
                rows_read = n // row_size(self.step.shape) + 2 * ROWS
                size += rows_read * row_size(self.step.shape) * 4 + rows_read * p.down.shape[0] * (ITEMSIZE[p.tensor.dtype] + 4) + p.down.numel * 4
        return size


def _itemsize(dtype: str) -> int:
    """Bytes per element at most; a GGUF block type's (de)quantization holds float32 temporaries of its own."""
    if dtype in BLOCK_TYPES:
        return 4 * 4
    return ITEMSIZE[dtype]


def ranges(part: Part, step: Step, chunk_elements: int) -> Iterable[tuple[int, int]]:
    """The chunks of a part: chunk_elements each; for a step with a LoRA product, whole blocks of ROWS rows
    (chunk_elements rounded down to them, at least one), on the tensor's grid of blocks; for a step that reads
    or writes a GGUF block type, whole blocks of it (parts start on rows, and rows are whole blocks)."""
    size = chunk_elements
    quant = max((BLOCK_TYPES[t][0] for t in (step.dtype, *(r.dtype for r in step.inputs)) if t in BLOCK_TYPES), default=1)
    size = max(quant, size // quant * quant)  # block sizes are powers of two: the largest is a multiple of the others
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


def run_in_order(work: Iterable[Chunk | object], compute: Callable[[Chunk], Any], finish: Callable[[Chunk, Any], None], workers: int, in_flight: int, most_items: int) -> int:
    """Compute the chunks of `work` on `workers` threads under the byte budget, `finish` each in the main
    thread in the order given; DRAIN waits for everything given so far. Returns the peak bytes in flight."""
    pending: deque[tuple[Chunk, Future]] = deque()
    held = peak = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="fluxrecipe") as pool:
        try:
            for chunk in work:
                while pending and (chunk is DRAIN or held + chunk.nbytes > in_flight or len(pending) >= most_items):
                    done, future = pending.popleft()
                    held -= done.nbytes
                    finish(done, future.result())
                if chunk is not DRAIN:
                    pending.append((chunk, pool.submit(compute, chunk)))
                    held += chunk.nbytes
                    peak = max(peak, held)
            while pending:
                done, future = pending.popleft()
                finish(done, future.result())
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return peak

