"""TIES' threshold: per task vector, the exact k-th largest |tau_i| (k = ceil(density * n)), whatever the
chunking, in one statistics pass where it can be, two where it must.

A radix select over the float32 bit patterns of |tau| (ordered as the magnitudes are), with histograms of
exact integer counts: the high 16 bits over the whole tensor give the bin of the k-th largest and its rank
inside that bin; the low 16 bits of the values in that bin give the value. Which bin that is, only the
whole tensor says, so the same pass counts the low bits within a window around each chunk's own k-th
largest: where every chunk's window holds the bin (a tensor whose values are alike from chunk to chunk, as
a weight's rows are), the threshold is known after one pass, and the inputs are read twice in all (this
pass, then the values). Where they do not (tiny chunks, rows of very different sizes), a second pass
counts the low bits of that one bin: a third read, the same exact threshold.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from .registry import StatPass, Where

if TYPE_CHECKING:
    from torch import Tensor

HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16  # bins of the high 16 bits of |tau|'s float32 pattern (sign 0), then the low 16
WINDOW = 16  # high bins either side of a chunk's own k-th largest whose low bits it counts (1/128 octave each: +-12%)
MOST_BINS = 4 * WINDOW + 1  # the widest first window whose low bits are counted (int32 counts: 256 KiB a bin)
DENSE_WINDOW = 2  # a window holding at least half as many values as it has low bins is counted densely (int32 counts: at most 2 chunks' bytes)


def _magnitudes(xs: list[Tensor]) -> list[Tensor]:
    """Per task vector, the float32 bit pattern of |tau_i| as int32: ordered as the magnitudes are."""
    import torch

    return [torch.sub(x, xs[0]).view(torch.int32).bitwise_and_(0x7FFFFFFF) for x in xs[1:]]


def _histogram(values: Tensor, bins: int) -> tuple[Tensor | None, Tensor]:
    """Exact counts of the values in [0, bins): (values, counts) when there are few, else (None, dense counts)."""
    import torch

    if values.numel() * 16 < bins:
        found, counts = torch.unique(values, return_counts=True)
        return found.long(), counts
    return None, torch.bincount(values, minlength=bins)


def _add_histograms(state: list | None, partial: list[tuple], bins: int) -> list:
    import torch

    state = [torch.zeros(bins, dtype=torch.int64) for _ in partial] if state is None else state
    for counts, (found, n) in zip(state, partial):
        if found is None:
            counts += n.cpu()
        else:
            counts.index_add_(0, found.cpu(), n.cpu())
    return state


def _kth_largest_bin(counts: Tensor, k: int) -> tuple[int, int]:
    """The bin of the k-th largest value, and its rank inside that bin (1: the bin's largest)."""
    import torch

    above = torch.flip(counts, [0]).cumsum(0)  # above[j]: values in the top j + 1 bins
    j = int(torch.searchsorted(above, torch.tensor([k]))[0])
    return len(counts) - 1 - j, k - (int(above[j - 1]) if j else 0)


def _bin_of_rank(histogram: tuple[Tensor | None, Tensor], rank: int) -> int:
    """The bin of the rank-th largest value counted by _histogram (either form)."""
    import torch

    found, counts = histogram
    if found is None:
        return _kth_largest_bin(counts, rank)[0]
    above = torch.flip(counts, [0]).cumsum(0)
    return int(found[len(found) - 1 - int(torch.searchsorted(above, torch.tensor([rank]))[0])])


def _kept_count(density: float, n: int) -> int:
    """k = ceil(density * n), with density as its decimal (12 significant digits): 0.1 of 10 keeps 1, not 2."""
    return math.ceil(Fraction(f"{density:.12g}") * n)


@dataclass(frozen=True)
class Selection:
    """Where one task vector's k-th largest |tau| lies: the high 16 bits of its float32 pattern, its rank
    among the values with those high bits (1: their largest), and the value itself once it is known."""

    high: int
    rank: int
    threshold: float | None = None


def _pattern_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _high_partial(xs: list[Tensor], where: Where, stats: tuple, params: dict) -> list[tuple]:
    """Per task vector: a histogram of the high 16 bits of |tau| (exact counts, whatever the chunking), and
    the chunk's window with exact counts of the low 16 bits of every |tau| in it (_window_counts: (high - first) *
    2^16 + low, and their counts). The window: WINDOW high bins either side of those that hold the chunk's
    own k-th largest give or take four standard deviations of its rank (none of either where the chunk is
    the whole tensor: its own is the one). A small chunk's window is wide, but it holds few values. A chunk
    where tau is 0 throughout (what a source left as the base has it) is counted from one test, not two passes."""
    import torch

    whole = where.start == 0 and where.total in (None, where.stop)
    parts = []
    for bits in _magnitudes(xs):
        n = bits.numel()
        unchanged = (torch.zeros(1, dtype=torch.long), torch.tensor([n])) if n and not int(bits.amax()) else None  # all in bin 0 (and the window from 0: key 0); amax: any() casts to bool, 10x slower
        high = None if unchanged else bits >> 16
        k = _kept_count(params["density"], n)
        spread = 0 if whole else math.ceil(4 * math.sqrt(k)) + 1
        low_rank, high_rank = max(1, k - spread), min(n, k + spread)  # ranks from the largest
        histogram = unchanged or _histogram(high, HIGH_BINS)
        first, last = (max(_bin_of_rank(histogram, high_rank) - WINDOW, 0), min(_bin_of_rank(histogram, low_rank) + WINDOW, HIGH_BINS - 1)) if n else (0, 0)
        parts.append((histogram, (first, last, *(unchanged or _window_counts(bits, high, histogram, first, last)))))
    return parts


def _window_counts(bits: Tensor, high: Tensor, histogram: tuple[Tensor | None, Tensor], first: int, last: int) -> tuple[Tensor | None, Tensor]:
    """Exact counts of the low 16 bits of the |tau| whose high bits lie in [first, last], keyed (high - first)
    * 2^16 + low: (keys, counts) where the window holds few of the chunk's values (a sort of those alone),
    (None, dense counts) where it holds many and is not too wide to be kept (one bincount over the chunk: a tensor of equal values, such as
    zeros, would make the sort cost 20x the bincount)."""
    import torch

    found, counts = histogram
    inside = int(counts[first : last + 1].sum()) if found is None else int(counts[(found >= first) & (found <= last)].sum())
    span = (last - first + 1) << 16
    if last - first < MOST_BINS and inside * DENSE_WINDOW >= span:
        keys = torch.sub(bits, first << 16).clamp_(-1, span).add_(1)  # 0: below the window, span + 1: above it
        return None, torch.bincount(keys, minlength=span + 2)[1:-1].int()
    found, counts = torch.unique(bits[(high >= first) & (high <= last)] - (first << 16), return_counts=True)
    return found.long(), counts


def _high_fold(state: list | None, partial: list[tuple]) -> list:
    """The high histograms added up; the low counts kept for the bins inside every chunk's window so far
    (int32: a tensor has fewer than 2^31 elements)."""
    import torch

    highs = _add_histograms(state[0] if state else None, [histogram for histogram, _ in partial], HIGH_BINS)
    windows = []
    for i, (_, window) in enumerate(partial):
        begin, end, low = (0, -1, None) if state is None else state[1][i]
        first, last, found, counts = window
        if (low is None or max(begin, first) > min(end, last)) if state is not None else last - first >= MOST_BINS:
            windows.append((0, -1, None))  # no bin in every window (or too many to count): the low pass decides
            continue
        if state is None:
            begin, end, low = first, last, torch.zeros((last - first + 1) << 16, dtype=torch.int32)
        else:
            low = low[(max(begin, first) - begin) << 16 : (min(end, last) - begin + 1) << 16]
            begin, end = max(begin, first), min(end, last)
        offset = (first - begin) << 16  # the chunk's window starts this far into the kept one (<= 0)
        if found is None:
            low += counts[-offset : low.numel() - offset]
        else:
            keys = found + offset
            keep = (keys >= 0) & (keys < low.numel())
            low.index_add_(0, keys[keep], counts[keep].int())
        windows.append((begin, end, low))
    return [highs, windows]


def _high_result(state: list, params: dict) -> tuple[Selection, ...]:
    """Per task vector: the high 16 bits of its k-th largest |tau| and that value's rank among them; the
    value itself where those high bits were inside every chunk's window (then the low pass is not needed)."""
    selections = []
    for counts, (begin, end, low) in zip(*state):
        high, rank = _kth_largest_bin(counts, _kept_count(params["density"], int(counts.sum())))
        threshold = None
        if low is not None and begin <= high <= end:
            bits, _ = _kth_largest_bin(low[(high - begin) << 16 : (high - begin + 1) << 16].long(), rank)
            threshold = _pattern_value(high << 16 | bits)
        selections.append(Selection(high, rank, threshold))
    return tuple(selections)


def _low_needed(stats: tuple) -> bool:
    return any(s.threshold is None for s in stats[0])


def _low_partial(xs: list[Tensor], where: Where, stats: tuple, params: dict) -> tuple[tuple, list[tuple | None]]:
    """Per task vector whose threshold is not known yet: a histogram of the low 16 bits of the |tau| whose
    high 16 bits are the k-th largest's (every other |tau| counted in one extra bin, LOW_BINS: no
    data-dependent selection)."""
    parts = []
    for bits, selection in zip(_magnitudes(xs), stats[0]):
        if selection.threshold is not None:
            parts.append(None)
            continue
        other = ((bits >> 16) ^ selection.high).clamp_(max=1)  # 0 where the high bits match, else 1
        parts.append(_histogram(((bits & 0xFFFF) | (other << 16)).clamp_(max=LOW_BINS), LOW_BINS + 1))
    return stats[0], parts


def _low_fold(state: tuple | None, partial: tuple[tuple, list[tuple | None]]) -> tuple[tuple, list]:
    selections, parts = partial
    needed = [part for part in parts if part is not None]
    return selections, _add_histograms(state[1] if state else None, needed, LOW_BINS + 1)


def _low_result(state: tuple, params: dict) -> tuple[Selection, ...]:
    """Per task vector: the exact k-th largest |tau| (the threshold: every |tau| at or above it is kept)."""
    selections, histograms = state
    found = iter(histograms)
    done = []
    for selection in selections:
        if selection.threshold is None:
            low, _ = _kth_largest_bin(next(found)[:LOW_BINS], selection.rank)
            selection = Selection(selection.high, selection.rank, _pattern_value(selection.high << 16 | low))
        done.append(selection)
    return tuple(done)


# One pass finds the threshold wherever the chunks' windows agree on the bin that holds it (a tensor whose
# values are alike from chunk to chunk); the low pass, a second read, only where they do not.
TIES_PASSES = (
    StatPass(_high_partial, _high_fold, _high_result),
    StatPass(_low_partial, _low_fold, _low_result, needed=_low_needed),
)
