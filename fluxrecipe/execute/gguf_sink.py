"""The sink of a `format=gguf` output: one GGUF file, written front to back as the chunks arrive.

The header comes first, whole, from the plan (every tensor's type and size is known before a value is
computed), then each tensor's bytes in plan order, zeros up to the next tensor's aligned start and after the
last, as gguf's writer pads. The header is written with room (`header_size`), so that packaging can write it
again with what only the run knows (the provenance, the data's sha256) without moving a tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats import gguf_model
from ..plan import Plan
from ..writer import open_gguf
from .result import Result


class GGUFFile:
    def __init__(self, plan: Plan, folder: Path, metadata: dict[str, str], header_size: int, result: Result):
        self.out, self.result = plan.files[0], result
        kvs = gguf_model.metadata(gguf_model.file_type(plan.gguf_type), metadata)
        self.header = gguf_model.encode(str(folder / self.out.name), self.out, kvs, header_size)
        self.file = open_gguf(folder / self.out.name, self.header.data, self.header.size)
        self.current = 0  # the tensor whose bytes come next

    def write(self, index: int, data: torch.Tensor) -> None:  # noqa: ARG002 (one file: its index is 0)
        tensor = self.header.tensors[self.current]
        if self.file.size == tensor.begin + tensor.nbytes:  # it is whole: the next one starts at its aligned offset
            self.current += 1
            self._zeros_to(self.header.tensors[self.current].begin)
        self.file.write(data.numpy())

    def _zeros_to(self, offset: int) -> None:
        if offset > self.file.size:
            self.file.write(bytes(offset - self.file.size))

    def close(self) -> None:
        self._zeros_to(self.header.size)
        self.result.files[self.out.name] = self.file.close()
        self.file = None

    def abort(self) -> None:
        if self.file is not None:
            self.file.abort()
            self.file = None
