"""Tensor references, both ways: where a canonical tensor's bytes lie in the sources, and which canonical
tensors make up each tensor of an output file.

Planner and executor see canonical keys only: the parameter names of the model family's diffusers class.
A format module (diffusers.py, bfl.py) maps the keys of its files to canonical keys when a source is read,
and canonical keys to the keys of its files when an output is planned. Every mapping a family needs is a
rename or a split/concatenation along dim 0 (BFL's fused tensors, its final layer with the two halves
swapped: families/base.BflTable), and a dim-0 slice of a row-major tensor is one contiguous byte range: so a source
tensor is a list of byte pieces, and an output tensor a list of element ranges of canonical tensors. No
format needs arithmetic, except scaled fp8, whose stored values are multiplied by a per-tensor scale.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from .gguf import BLOCK_TYPES
from .safetensors import ITEMSIZE


def stored_bytes(dtype: str, numel: int) -> int:
    """Bytes of `numel` elements stored as `dtype`: a safetensors dtype, or a GGUF block type (of whole blocks:
    every range the plan reads or writes in one starts and ends on a row, and rows are whole blocks)."""
    if dtype in ITEMSIZE:
        return numel * ITEMSIZE[dtype]
    elements, nbytes = BLOCK_TYPES[dtype]
    return numel // elements * nbytes


@dataclass(frozen=True)
class Piece:
    """A run of bytes in a file: part of a tensor's data."""

    file: str
    begin: int  # absolute offset in the file
    nbytes: int


@dataclass(frozen=True)
class Scale:
    """Scaled fp8: the scalar that multiplies every stored value of a tensor, read when the source is opened
    (a few bytes), so that the plan holds and checks the very number the merge multiplies by."""

    value: float
    file_key: str


@dataclass(frozen=True)
class TensorRef:
    """One canonical tensor of a source: its dtype and shape, and its bytes, pieces concatenated along dim 0."""

    source: str
    key: str  # canonical key
    file_key: str  # the file's key it comes from (with the row range when it is part of a fused tensor)
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    scale: Scale | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.dtype, self.numel)

    @property
    def file(self) -> str:
        return self.pieces[0].file if self.pieces else ""

    def byte_ranges(self, start: int, stop: int) -> list[Piece]:
        """The bytes of elements [start, stop), piece by piece (a range may span the pieces' seams)."""
        begin, end = stored_bytes(self.dtype, start), stored_bytes(self.dtype, stop)
        ranges, offset = [], 0
        for piece in self.pieces:
            lo, hi = max(begin, offset), min(end, offset + piece.nbytes)
            if lo < hi:
                ranges.append(Piece(piece.file, piece.begin + lo - offset, hi - lo))
            offset += piece.nbytes
            if offset >= end:
                break
        return ranges


@dataclass(frozen=True)
class Part:
    """Elements [start, stop) of the canonical output tensor `key`: a slice of an output file's tensor."""

    key: str
    start: int
    stop: int


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an output file: its parts concatenated in order, stored as `dtype`.

    `scale_name` (scaled fp8) names the F32 scalar written after the file's tensors: stored = value / scale,
    scale = absmax / the dtype's largest finite value, so that the tensor fills the fp8 range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    scale_name: str | None = None

    @property
    def nbytes(self) -> int:
        return stored_bytes(self.dtype, math.prod(self.shape))


@dataclass(frozen=True)
class Constant:
    """A tensor whose bytes the plan already knows (ComfyUI's per-layer `comfy_quant` markers)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class OutFile:
    """One safetensors file of the output: its tensors, then their scales (F32), then its constants."""

    name: str  # relative to the output folder
    tensors: tuple[OutTensor, ...]
    constants: tuple[Constant, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    def entries(self, without: Collection[str] = ()) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor in the order the data is stored: the header's contents; less
        those named in `without` (a LoRA output's matrices that did not differ from the base: not written)."""
        scales = [(t.scale_name, "F32", ()) for t in self.tensors if t.scale_name]
        listed = [(t.name, t.dtype, t.shape) for t in self.tensors] + scales + [(c.name, c.dtype, c.shape) for c in self.constants]
        return [entry for entry in listed if entry[0] not in without]

    @property
    def nbytes(self) -> int:
        return sum(stored_bytes(dtype, math.prod(shape)) for _, dtype, shape in self.entries())


def whole(key: str, shape: tuple[int, ...]) -> tuple[Part, ...]:
    return (Part(key, 0, math.prod(shape)),)


def rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def row_size(shape: tuple[int, ...]) -> int:
    """Elements per dim-0 row (1 for a 1-D tensor)."""
    return math.prod(shape[1:])
