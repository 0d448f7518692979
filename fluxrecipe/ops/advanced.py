"""The advanced merge methods: slerp, task arithmetic, TIES, DARE, DARE-TIES, model stock, train difference.

The base is the rule's first source, the task vectors tau_i = x_i - base (i >= 2), all in float32. What a
method needs of the whole tensor is gathered in statistics passes before its element-wise pass, and never
depends on how the tensor is cut: slerp's and model stock's dot products are float64 sums over fixed
segments (a product of two float32 values is exact in float64; segments.py; the segment sums are added
exactly), TIES' magnitude threshold is the exact k-th largest |tau_i| (threshold.py). DARE's masks are
counter-based: each element's draw is a hash of (seed, canonical key, source, element index), so the same
seed gives the same bytes on any thread count, chunk size or order, and every key and source gets its own
mask.

Element-wise work runs in slices of SLICE elements, so the temporaries of a method with several task vectors
stay a few MB whatever the chunk size. Planning parses these ops without torch: torch is imported where the
work is done.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Literal

from .registry import StatPass, TaskWeights, Where, op
from .threshold import TIES_PASSES

if TYPE_CHECKING:
    from torch import Tensor

SLICE = 1 << 16  # elements per slice of work; a multiple of segments.SEGMENT, so slices cut no segment
COLLINEAR = 0.9995  # slerp: above this |cos| the tensors are too close to parallel; lerp instead
CANCEL = 1e-6  # model stock: below this 1 + (N - 1) cos the task vectors cancel out; the base
# SplitMix64 (Steele, Lea, Flood 2014) in signed int64 arithmetic: its increment and multipliers.
GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
MIX2 = 0x94D049BB133111EB - (1 << 64)
UNIFORM_BITS = 53


# --- shared pieces -----------------------------------------------------------------------------------------


def _slices(start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) cut at the multiples of SLICE (one empty slice for an empty range)."""
    if start == stop:
        return [(start, stop)]
    cuts = [start, *range((start // SLICE + 1) * SLICE, stop, SLICE), stop]
    return list(zip(cuts, cuts[1:]))


def _sliced(xs: list[Tensor], compute: Callable[[list[Tensor], int, int], Tensor], start: int = 0) -> Tensor:
    """compute(xs of a slice, its first and end element index in the tensor) over the chunk's slices."""
    import torch

    out = torch.empty(xs[0].numel(), dtype=torch.float32, device=xs[0].device)
    for a, b in _slices(start, start + xs[0].numel()):
        out[a - start : b - start] = compute([x[a - start : b - start] for x in xs], a, b)
    return out


def _weights(weights: tuple[float, ...] | None, xs: list[Tensor]) -> tuple[float, ...]:
    return weights if weights is not None else (1.0,) * (len(xs) - 1)


def _task_sum(base: Tensor, taus: list[Tensor], weights: tuple[float, ...], lambda_: float) -> Tensor:
    """base + lambda * (w_1 tau_1 + w_2 tau_2 + ...), summed left to right."""
    total = taus[0] * weights[0]
    for tau, w in zip(taus[1:], weights[1:]):
        total += tau * w
    return base + total * lambda_


def _disjoint_mean(base: Tensor, taus: list[Tensor], weights: tuple[float, ...], lambda_: float, sign: str) -> Tensor:
    """TIES' sign election and disjoint mean: gamma = the sign of sum(w_i tau_i) (`count`: of the sum of the
    signs; 0 counts as +), then the weighted mean of the tau_i whose sign is gamma (0 where none is, or
    where their weights add up to 0); base + lambda * that. (Masks are 0/1 float32 tensors, made with sign
    and clamp: boolean masks and torch.where are several times slower on the CPU. A product by 1.0, the
    default weight and lambda, is left out: it changes no bit. The taus are consumed.)"""
    weighted = [_times(tau, w) for tau, w in zip(taus, weights)]
    if sign == "sum":
        vote = weighted[0] + weighted[1] if len(weighted) > 1 else weighted[0].clone()
        for term in weighted[2:]:
            vote += term
    else:
        vote = taus[0].sign()
        for tau in taus[1:]:
            vote += tau.sign()
    gamma = vote.sign_().add_(0.5).sign_()  # +1 or -1: 0 counts as +
    total, share = None, None
    for tau, term, w in zip(taus, weighted, weights):
        agrees = (tau * gamma).sign_().clamp_(min=0.0)  # 1 where tau has gamma's sign, else 0
        total = term.mul_(agrees) if total is None else total.add_(term.mul_(agrees))
        share = _times(agrees, w) if share is None else share.add_(agrees if w == 1.0 else agrees.mul_(w))
    mean = total.div_(share).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # x / 0: no agreeing weight
    return base + _times(mean, lambda_)


def _zero(values: Tensor) -> bool:
    """Whether every value is 0 (finite values: their least and largest are); aminmax, not any(), which
    casts to bool first and takes 5 times as long."""
    import torch

    least, largest = torch.aminmax(values)
    return not float(least) and not float(largest)


def _times(values: Tensor, factor: float) -> Tensor:
    """values * factor, or values themselves where factor is 1.0 (x * 1.0 is x, bit for bit)."""
    return values if factor == 1.0 else values * factor


def _segment_sums(products: Callable[[list[Tensor]], list[Tensor]], result: Callable[[tuple[float, ...], dict], Any]) -> StatPass:
    """A statistics pass of float64 sums over the whole tensor, one per tensor `products(xs)` returns (per
    element, float64), each per fixed segment and then exactly: the same bits however the tensor is chunked.
    `result(sums, params)` turns the sums into what the op receives."""

    def partial(xs: list[Tensor], where: Where, stats: tuple, params: dict) -> tuple[int, list[list]]:
        from ..segments import row_sums, split

        total = where.stop if where.total is None else where.total
        parts: list[list] = []
        for a, b in _slices(where.start, where.stop):
            terms = products([x[a - where.start : b - where.start] for x in xs])
            parts = [[] for _ in terms] if not parts else parts
            for collected, term in zip(parts, terms):
                collected.append(split(term, a, total, row_sums))
        return total, parts

    def fold(state: list | None, partial: tuple[int, list[list]]) -> list:
        from ..segments import Segments, row_sums

        total, parts = partial
        state = [Segments(total, row_sums) for _ in parts] if state is None else state
        for sums, collected in zip(state, parts):
            for piece in collected:
                sums.add(piece)
        return state

    return StatPass(partial, fold, lambda state, params: result(tuple(s.fsum() for s in state), params))


# --- slerp ---------------------------------------------------------------------------------------------------


def _slerp_coefficients(sums: tuple[float, ...], params: dict) -> tuple[float, float]:
    """(s1, s2) with slerp = s1 * x1 + s2 * x2: from the angle of the flattened, normalised tensors; lerp's
    (1 - t, t) where a norm is 0 or |cos| > 0.9995."""
    dot, norm1, norm2 = sums
    t = params["t"]
    if norm1 == 0.0 or norm2 == 0.0:
        return 1.0 - t, t
    cos = dot / math.sqrt(norm1 * norm2)
    if abs(cos) > COLLINEAR:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp_products(xs: list[Tensor]) -> list[Tensor]:
    x1, x2 = xs[0].double(), xs[1].double()
    return [x1 * x2, x1 * x1, x2 * x2]


@op(inputs=(2, 2), formula="s1 * x1 + s2 * x2, s1 = sin((1-t) theta) / sin theta, s2 = sin(t theta) / sin theta, cos theta = <x1, x2> / (|x1| |x2|) per tensor; lerp where |cos| > 0.9995 or a norm is 0", shorthand=("t",), passes=(_segment_sums(_slerp_products, _slerp_coefficients),))
def slerp(xs: list[Tensor], t: float, stats: tuple = ()) -> Tensor:
    """Spherical interpolation from x1 (t 0) to x2 (t 1), per tensor as mergekit does it."""
    s1, s2 = stats[0]
    return (xs[0] * s1).add_(xs[1] * s2)


# --- task arithmetic, TIES -------------------------------------------------------------------------------


@op(inputs=(2, None), formula="base + lambda * (w2 tau2 + w3 tau3 + ...)", shorthand=("lambda",))
def task_arithmetic(xs: list[Tensor], weights: TaskWeights | None = None, lambda_: float = 1.0) -> Tensor:
    """Add the weighted task vectors of the sources after the first to it."""
    w = _weights(weights, xs)
    return _sliced(xs, lambda s, a, b: _task_sum(s[0], [x - s[0] for x in s[1:]], w, lambda_))



def _check_density(values: dict, inputs: int) -> str | None:
    density = values["density"]
    return None if 0.0 < density <= 1.0 else f"density must lie in (0, 1] (the fraction of each task vector kept), got {density}"


@op(inputs=(2, None), formula="base + lambda * disjoint_mean(trim(tau_i, density)); trim keeps |tau_i| >= its ceil(density * n)-th largest; gamma = sign(sum w_i t_i) (count: sign(sum sign t_i)), 0 as +; disjoint_mean = sum(w_i t_i) / sum(w_i) over the t_i of sign gamma (0/0: 0)", shorthand=("density",), passes=TIES_PASSES, check=_check_density)
def ties(xs: list[Tensor], density: float, weights: TaskWeights | None = None, lambda_: float = 1.0, sign: Literal["sum", "count"] = "sum", stats: tuple = ()) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its largest magnitudes, elect a sign, average what agrees."""
    import torch

    # hardshrink keeps |x| > its limit: the largest float32 below a threshold keeps exactly |x| >= it (the
    # trimmed values come out +0 where a product by a mask gave -0 to some: no output bit depends on it)
    limits, w = [float(torch.nextafter(torch.tensor(s.threshold), torch.tensor(-math.inf))) for s in stats[-1]], _weights(weights, xs)

    def compute(s: list[Tensor], a: int, b: int) -> Tensor:
        taus = [torch.nn.functional.hardshrink(x - s[0], limit) for x, limit in zip(s[1:], limits)]  # trimmed: 0 below the threshold
        if all(_zero(tau) for tau in taus):  # nothing kept (a slice no source changed): every mean is 0/0, so 0
            return s[0] + 0.0 * lambda_
        return _disjoint_mean(s[0], taus, w, lambda_, sign)

    return _sliced(xs, compute)


# --- DARE ------------------------------------------------------------------------------------------------


def stream_key(seed: int, key: str, source: str) -> int:
    """The 64-bit key of one random stream: the first 8 bytes (little-endian, signed) of the BLAKE2b hash of
    'SEED\\0KEY\\0SOURCE'. Every (seed, canonical key, source) has its own stream."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{source}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def uniform_bits(stream: int, start: int, stop: int, device: Any = None) -> Tensor:
    """53 random bits (int64, in [0, 2^53)) for elements [start, stop): element i gets SplitMix64's output
    number i of the stream (state stream + (i + 1) * gamma, mixed), shifted right by 11. A pure function of
    (stream, i): no state, no order."""
    import torch

    z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=device).mul_(GAMMA).add_(stream)
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, MIX1), (27, MIX2), (31, 1)):
        z.bitwise_xor_(_shift_right(z, bits, shifted)).mul_(multiplier)
    return _shift_right(z, 64 - UNIFORM_BITS, shifted)


def _shift_right(z: Tensor, bits: int, out: Tensor) -> Tensor:
    """A logical shift of int64 into `out` (torch's >> is arithmetic on signed values)."""
    import torch

    return torch.bitwise_right_shift(z, bits, out=out).bitwise_and_((1 << (64 - bits)) - 1)


def dropped_below(p: float) -> int:
    """An element is dropped when its 53 bits are below this: probability ceil(p 2^53) / 2^53, p to 2^-53."""
    return math.ceil(Fraction(p) * (1 << UNIFORM_BITS))


def dare_kept(tau: Tensor, p: float, seed: int, key: str, source: str, start: int) -> Tensor:
    """DARE's drop and rescale of the task vector elements [start, start + n) of `key` from `source`: each
    dropped (0) with probability p, the others tau / (1 - p) (a float32 division)."""
    keep = uniform_bits(stream_key(seed, key, source), start, start + tau.numel(), tau.device) >= dropped_below(p)
    return (tau / (1.0 - p)).mul_(keep)


def _dare_taus(s: list[Tensor], p: float, seed: int, where: Where, a: int) -> list[Tensor]:
    return [dare_kept(x - s[0], p, seed, where.key, source, a) for x, source in zip(s[1:], where.sources[1:])]


def _check_p(values: dict, inputs: int) -> str | None:
    p = values["p"]
    return None if 0.0 <= p < 1.0 else f"p must lie in [0, 1) (the probability that an element of a task vector is dropped), got {p}"


@op(inputs=(2, None), formula="base + lambda * sum(w_i * m_i * tau_i / (1 - p)), m_i: keep each element with probability 1 - p (seeded by seed, key, source, index)", shorthand=("p",), check=_check_p)
def dare(xs: list[Tensor], p: float, weights: TaskWeights | None = None, lambda_: float = 1.0, seed: int = 0, where: Where | None = None) -> Tensor:
    """DARE (Yu et al. 2023): drop task vector elements at random, rescale the rest, add them up (task arithmetic)."""
    w = _weights(weights, xs)
    return _sliced(xs, lambda s, a, b: _task_sum(s[0], _dare_taus(s, p, seed, where, a), w, lambda_), where.start)


@op(inputs=(2, None), formula="base + lambda * disjoint_mean(m_i * tau_i / (1 - p)): DARE's masks, then TIES' sign election and disjoint mean (no trim)", shorthand=("p",), check=_check_p)
def dare_ties(xs: list[Tensor], p: float, weights: TaskWeights | None = None, lambda_: float = 1.0, seed: int = 0, sign: Literal["sum", "count"] = "sum", where: Where | None = None) -> Tensor:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""
    w = _weights(weights, xs)
    return _sliced(xs, lambda s, a, b: _disjoint_mean(s[0], _dare_taus(s, p, seed, where, a), w, lambda_, sign), where.start)


# --- model stock, train difference ----------------------------------------------------------------------


def _stock_products(xs: list[Tensor]) -> list[Tensor]:
    """tau_i . tau_j for i <= j (the norms among them), per element in float64."""
    taus = [(x - xs[0]).double() for x in xs[1:]]
    return [taus[i] * taus[j] for i in range(len(taus)) for j in range(i, len(taus))]


def _stock_ratio(sums: tuple[float, ...], params: dict) -> float:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the N task vectors (0 for a pair with a
    zero vector). Where the task vectors cancel out (cos = -1/(N - 1): the denominator below 1e-6, where t
    diverges), t = 0: the base."""
    n = (math.isqrt(8 * len(sums) + 1) - 1) // 2
    at = {}
    for i in range(n):
        for j in range(i, n):
            at[i, j] = sums[len(at)]
    cosines = [max(-1.0, min(1.0, at[i, j] / math.sqrt(at[i, i] * at[j, j]))) if at[i, i] and at[j, j] else 0.0 for i in range(n) for j in range(i + 1, n)]
    cos = math.fsum(cosines) / len(cosines)
    denominator = 1.0 + (n - 1) * cos
    return n * cos / denominator if denominator >= CANCEL else 0.0


@op(inputs=(3, None), formula="t * mean(x2, x3, ...) + (1 - t) * base, t = N cos / (1 + (N - 1) cos), cos = mean pairwise cosine of the N task vectors, per tensor (t = 0 where they cancel out)", passes=(_segment_sums(_stock_products, _stock_ratio),))
def model_stock(xs: list[Tensor], stats: tuple = ()) -> Tensor:
    """Model Stock (Jang et al. 2024): the base and two or more fine-tunes of it, weighted by how their task vectors agree."""
    t, n = stats[0], len(xs) - 1

    def compute(s: list[Tensor], a: int, b: int) -> Tensor:
        mean = s[1].clone()
        for x in s[2:]:
            mean += x
        return mean.div_(n).mul_(t).add_(s[0] * (1.0 - t))

    return _sliced(xs, compute)


@op(inputs=(3, 3), formula="x1 + 1.8 * alpha * (x2 - x3) * |x2 - x1| / (|x2 - x1| + |x2 - x3|)  (0/0: 0)", shorthand=("alpha",))
def train_difference(xs: list[Tensor], alpha: float) -> Tensor:
    """Add what x2 learned over x3 to x1, scaled per element by how far x2 is from x1 (supermerger's train difference)."""
    def compute(s: list[Tensor], a: int, b: int) -> Tensor:
        difference = s[1] - s[2]
        near = (s[1] - s[0]).abs_()
        share = (near / (near + difference.abs())).nan_to_num_(nan=0.0)  # 0/0: x2 equals x1 and x3
        return s[0] + difference * share * (1.8 * alpha)

    return _sliced(xs, compute)
