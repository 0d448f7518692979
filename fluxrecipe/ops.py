"""Merge operations: small pure functions over float32 tensors, registered by name.

A recipe writes an op as `name` or `name:arg,arg,...`. Every op works element by element, so the executor
may feed it any slice of a tensor (it feeds row chunks) and get the same bits as for the whole tensor. Each
formula is written out in a fixed order of float32 operations, so a result does not depend on the chunking,
the number of threads, or the device; the caller rounds the result to the output dtype once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the ops run on torch tensors, but planning (which parses ops) needs no torch
    from torch import Tensor

OpFn = Callable[[list["Tensor"], tuple], "Tensor"]


def take(xs: list[Tensor], args: tuple) -> Tensor:
    """The named source's tensor, unchanged."""
    return xs[0]


def average(xs: list[Tensor], args: tuple) -> Tensor:
    """(x1 + x2 + ... + xn) / n, summed left to right."""
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total.div_(len(xs))


def lerp(xs: list[Tensor], args: tuple) -> Tensor:
    """(1 - a) * x1 + a * x2; a outside [0, 1] extrapolates."""
    (a,) = args
    return (xs[0] * (1.0 - a)).add_(xs[1] * a)


def weighted(xs: list[Tensor], args: tuple) -> Tensor:
    """w1 * x1 + w2 * x2 + ..., summed left to right, not normalised."""
    total = xs[0] * args[0]
    for x, w in zip(xs[1:], args[1:]):
        total += x * w
    return total


def add_difference(xs: list[Tensor], args: tuple) -> Tensor:
    """x1 + a * (x2 - x3): add what x2 learned over x3 to x1."""
    (a,) = args
    return xs[0] + (xs[1] - xs[2]).mul_(a)


@dataclass(frozen=True)
class OpSpec:
    """What the planner needs to know of an op besides its function."""

    fn: OpFn | None  # None: the key is not written
    inputs: int | None  # how many source tensors it takes; None: one or more
    args: str  # "none", "source" (one source name), "number" (one float), "numbers" (one per input)
    usage: str


OPS: dict[str, OpSpec] = {
    "take": OpSpec(take, 1, "source", "take:NAME"),
    "average": OpSpec(average, None, "none", "average"),
    "lerp": OpSpec(lerp, 2, "number", "lerp:A"),
    "weighted": OpSpec(weighted, None, "numbers", "weighted:W1,W2,..."),
    "add_difference": OpSpec(add_difference, 3, "number", "add_difference:A"),
    "drop": OpSpec(None, 0, "none", "drop"),
}


@dataclass(frozen=True)
class OpCall:
    """An op as a recipe wrote it, parsed: `lerp:0.3` -> OpCall("lerp", (0.3,))."""

    name: str
    args: tuple = ()

    @property
    def spec(self) -> OpSpec:
        return OPS[self.name]

    def __str__(self) -> str:
        return self.name + (":" + ",".join(_fmt(a) for a in self.args) if self.args else "")


def _fmt(a: object) -> str:
    return repr(a) if isinstance(a, float) else str(a)


def parse_op(text: str) -> OpCall:
    """Parse `name[:args]`; a ValueError says what is wrong, for the caller to place in the recipe."""
    name, _, rest = str(text).strip().partition(":")
    name = name.strip()
    if name not in OPS:
        raise ValueError(f"unknown op {name!r} (ops: {', '.join(spec.usage for spec in OPS.values())})")
    spec = OPS[name]
    parts = [p.strip() for p in rest.split(",")] if rest.strip() else []
    if spec.args == "none":
        if parts:
            raise ValueError(f"{name} takes no argument, got {rest.strip()!r} (usage: {spec.usage})")
        return OpCall(name)
    if not parts:
        raise ValueError(f"{name} needs an argument (usage: {spec.usage})")
    if spec.args == "source":
        if len(parts) != 1 or not parts[0]:
            raise ValueError(f"{name} takes one source name, got {rest.strip()!r} (usage: {spec.usage})")
        return OpCall(name, (parts[0],))
    numbers = tuple(_number(p, spec.usage) for p in parts)
    if spec.args == "number" and len(numbers) != 1:
        raise ValueError(f"{name} takes one number, got {len(numbers)} (usage: {spec.usage})")
    return OpCall(name, numbers)


def _number(text: str, usage: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (usage: {usage})") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number (usage: {usage})")
    return value
