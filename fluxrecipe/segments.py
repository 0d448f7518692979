"""Reductions over fixed segments of a tensor, computed chunk by chunk yet equal to the whole tensor's.

A float sum depends on the order of its terms, so a sum over a tensor computed per chunk would change with
the chunk size. Here every reduction runs over fixed segments of SEGMENT elements (segment i covers
elements [i * SEGMENT, (i + 1) * SEGMENT); the tensor's last one may be shorter), each segment always
through the same call on a row of the same length, whichever chunks delivered it: a worker reduces the
segments that lie wholly inside its chunk and hands back the elements of the one or two segments its
chunk's ends cut, raw; `Segments` joins those pieces, in element order, and reduces the segment once it is
whole. Chunks may arrive in any order. The per-segment results are then combined exactly (math.fsum for
sums), so a statistic depends on the tensor alone: not on the chunk size, the threads, or the order in
which an output layout visits the tensor's rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

SEGMENT = 1024

Reduce = Callable[[torch.Tensor], list]  # a (rows, length) tensor -> one result per row


def row_sums(rows: torch.Tensor) -> list[float]:
    return rows.sum(1).tolist()


@dataclass
class Partial:
    """What a worker hands back for elements [start, start + n) of a tensor: the results of the segments
    wholly inside, from segment `first`, and the raw elements of the segments cut at either end."""

    first: int
    results: list
    pieces: list[tuple[int, torch.Tensor]]  # (element offset, elements) of cut segments


def split(values: torch.Tensor, start: int, total: int, reduce: Reduce, size: int = SEGMENT) -> Partial:
    """Reduce the segments wholly inside `values` (elements [start, start + len) of a tensor of `total`
    elements); keep the elements of the segments its ends cut, raw."""
    stop = start + values.numel()
    if stop == start:
        return Partial(0, [], [])
    first, last = start // size, (stop - 1) // size
    a = first + 1 if first * size < start else first  # segments [a, b) lie wholly inside
    b = last if min((last + 1) * size, total) > stop else last + 1
    if a > b:  # one segment, cut at both ends
        return Partial(first, [], [(start, values.clone())])
    pieces = []
    if a > first:
        pieces.append((start, values[: a * size - start].clone()))
    if b <= last:
        pieces.append((b * size, values[b * size - start :].clone()))
    short = b > a and min(b * size, total) - (b - 1) * size < size  # the tensor's last segment, shorter
    full = b - a - short
    results: list = []
    if full:
        results += reduce(values[a * size - start : (a + full) * size - start].view(-1, size))
    if short:
        results += reduce(values[(b - 1) * size - start : min(b * size, total) - start].view(1, -1))
    return Partial(a, results, pieces)


@dataclass
class Segments:
    """The per-segment results of one tensor, gathered from Partials in any order."""

    total: int
    reduce: Reduce
    size: int = SEGMENT
    runs: dict[int, list] = field(default_factory=dict)  # first segment -> the results of a run of segments from it
    _count: int = 0  # segments with a result
    _pieces: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict)

    def add(self, partial: Partial) -> None:
        if partial.results:  # kept as the run it came in (a dict entry per segment cost more than the sums)
            self.runs[partial.first] = partial.results
            self._count += len(partial.results)
        for offset, elements in partial.pieces:
            self._add_piece(offset, elements)

    def _add_piece(self, offset: int, elements: torch.Tensor) -> None:
        while elements.numel():  # a piece may span segments only when chunks are shorter than one
            index = offset // self.size
            cut = min(elements.numel(), (index + 1) * self.size - offset)
            pieces = self._pieces.setdefault(index, [])
            pieces.append((offset, elements[:cut]))
            length = min(self.size, self.total - index * self.size)
            if sum(p.numel() for _, p in pieces) == length:
                del self._pieces[index]
                row = torch.cat([p for _, p in sorted(pieces, key=lambda p: p[0])])
                self.runs[index] = self.reduce(row.view(1, -1))
                self._count += 1
            offset, elements = offset + cut, elements[cut:]

    @property
    def complete(self) -> bool:
        return not self._pieces and self._count == -(-self.total // self.size)

    def ordered(self) -> list:
        return [result for first in sorted(self.runs) for result in self.runs[first]]

    def fsum(self) -> float:
        """The exact sum of the segment sums."""
        return math.fsum(itertools.chain.from_iterable(self.runs.values()))
