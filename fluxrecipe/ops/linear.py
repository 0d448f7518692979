"""The element-wise ops of recipe language v1: small pure functions over float32 tensors.

Every op here works element by element, so the executor may feed it any slice of a tensor and get the same
bits as for the whole tensor. Each formula is written out in a fixed order of float32 operations, so a
result does not depend on the chunking, the number of threads, or the device; the caller rounds the result
to the output dtype once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Source, op

if TYPE_CHECKING:  # the ops run on torch tensors, but planning (which parses ops) needs no torch
    from torch import Tensor


@op(inputs=(1, 1), formula="x_source", shorthand=("source",), identity=True)
def take(xs: list[Tensor], source: Source) -> Tensor:
    """The named source's tensor, unchanged (its bytes copied as they are when the dtype does not change)."""
    return xs[0]


@op(inputs=(1, None), formula="(x1 + x2 + ... + xn) / n")
def average(xs: list[Tensor]) -> Tensor:
    """The mean of the rule's sources, summed left to right."""
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total.div_(len(xs))


@op(inputs=(2, 2), formula="(1 - alpha) * x1 + alpha * x2", shorthand=("alpha",))
def lerp(xs: list[Tensor], alpha: float) -> Tensor:
    """Linear interpolation from the first source (alpha 0) to the second (alpha 1); outside [0, 1] extrapolates."""
    return (xs[0] * (1.0 - alpha)).add_(xs[1] * alpha)


@op(inputs=(1, None), formula="w1 * x1 + w2 * x2 + ... (not normalised)", shorthand=("weights",))
def weighted(xs: list[Tensor], weights: list[float]) -> Tensor:
    """A weighted sum of the rule's sources, summed left to right, not normalised."""
    total = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        total += x * w
    return total


@op(inputs=(3, 3), formula="x1 + alpha * (x2 - x3)", shorthand=("alpha",))
def add_difference(xs: list[Tensor], alpha: float) -> Tensor:
    """Add what x2 learned over x3 to x1."""
    return xs[0] + (xs[1] - xs[2]).mul_(alpha)


@op(inputs=(0, 0), formula="(the key is not written)", writes=False)
def drop(xs: list[Tensor]) -> Tensor:
    """The key is not written; the plan still checks that the output loads."""
    raise AssertionError("drop is planned away, never executed")
