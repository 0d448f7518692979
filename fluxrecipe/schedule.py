"""Per-block schedules: a numeric parameter whose value depends on the block of the key.

A recipe gives any numeric op parameter (or a recipe parameter an op uses) as
- a number: every key gets it;
- a list of 2 or more numbers: a gradient over the blocks in model order (each group's blocks GROUP.0..N-1,
  one group after another, or beside the one before it: families/base.Group), the numbers spread evenly over
  them and interpolated linearly; the keys before the blocks (the embedders) take the first number, those
  after them (the final layer) the last;
- a mapping from block names (each family's own, families/: for FLUX.1, ComfyUI ModelMergeFlux1's), ranges of
  blocks (GROUP.0-9, both ends included), the groups, and default, to numbers or lists: the most specific
  name wins (a block over the narrowest range holding it over its group over default; two overlapping ranges
  of one width are refused), a list under a group or a range is a gradient over it (under default, over all
  blocks), and a mapping without default must name every block of the keys it decides. A group may also hold
  a mapping of block numbers or ranges, `{GROUP: {7: 0.5}}`, the same as `{GROUP.7: 0.5}`: that is how Hydra
  addresses `recipe.alpha.GROUP.7` on the command line (a dotted name nests the same way).

Block names are the same in every layout (canonical keys are diffusers' names; the family's block_of maps
them). `parse` checks what needs no model (at recipe time: a name of any family's vocabulary); `check_against`
what needs the model's family, its blocks and the keys a rule decides, and `value_for` gives a key its number
(at plan time), so a plan holds plain numbers per key.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from . import families
from .families import Family
from .text import cut

TOP, GROUPS, FINAL = families.vocabulary()  # every family's block names: a recipe is read before its model is known
DEFAULT = "default"
NAMES = (DEFAULT, *TOP, *GROUPS, *FINAL)  # the vocabulary, besides GROUP.N
INDEXED = re.compile(rf"({'|'.join(map(re.escape, GROUPS))})\.(\d+)")
RANGE = re.compile(rf"({'|'.join(map(re.escape, GROUPS))})\.(\d+)-(\d+)")  # GROUP.0-9: blocks 0 to 9, both included


@dataclass(frozen=True)
class Blocks:
    """The blocks a model has: its family (names, model order) and how many blocks of each of its groups
    (gradients spread over them)."""

    family: Family
    counts: tuple[int, ...]  # per group, in the family's order

    @classmethod
    def of(cls, keys: Iterable[str], family: Family) -> Blocks:
        keys = list(keys)
        return cls(family, tuple(family.count(keys, group) for group in family.groups))

    def count(self, group: str) -> int:
        return self.counts[self.family.groups.index(group)] if group in self.family.groups else 0

    @cached_property
    def _starts(self) -> tuple[dict[str, int], int]:
        """Each group's first depth, and the model's depth: the groups one after another, but a group that
        runs beside the one before it (another stream of the same stage) starts where that one starts."""
        starts, start, stage = {}, 0, 0
        for group, count in zip(self.family.bfl.groups, self.counts):
            if not group.beside:
                start, stage = start + stage, 0
            starts[group.bfl], stage = start, max(stage, count)
        return starts, start + stage

    def position(self, group: str, index: int) -> int:
        """A block's depth among all the model's blocks in model order (what a gradient over them follows)."""
        return self._starts[0][group] + index

    def depth(self) -> int:
        """How many depths the model's blocks span (the positions a gradient over them is spread over)."""
        return self._starts[1]

    def order(self) -> list[str]:
        """Every block name in model order."""
        indexed = [f"{g}.{i}" for g, n in zip(self.family.groups, self.counts) for i in range(n)]
        return [*self.family.top_blocks, *indexed, *self.family.final_blocks]

    def names(self) -> str:
        """The model's block vocabulary, for messages: its blocks before the groups, 'GROUP.0..N-1' per group,
        its blocks after them."""
        ranges = [f"{g}.0..{n - 1}" for g, n in zip(self.family.groups, self.counts) if n]
        return ", ".join([*self.family.top_blocks, *ranges, *self.family.final_blocks])


@dataclass(frozen=True)
class Schedule:
    """A number per block, as name -> number or gradient (a top-level list is {default: list})."""

    entries: tuple[tuple[str, Any], ...]

    @cached_property
    def mapping(self) -> dict[str, Any]:
        return dict(self.entries)

    def at(self, block: str | None, blocks: Blocks) -> float:
        """The number of `block` in a model with `blocks`; a ValueError when the schedule gives it none."""
        entries = self.mapping
        if block in entries:
            return entries[block]
        m = INDEXED.fullmatch(block or "")
        ranges = [(int(r[3]) - int(r[2]), int(r[2]), name) for name in entries if (r := RANGE.fullmatch(name)) and m and r[1] == m[1] and int(r[2]) <= int(m[2]) <= int(r[3])]
        if ranges:  # the narrowest range holding the block (parse refuses two as wide that overlap)
            width, first, name = min(ranges)
            return _along(entries[name], int(m[2]) - first, width + 1)
        if m and m[1] in entries:
            return _along(entries[m[1]], int(m[2]), blocks.count(m[1]))
        if DEFAULT in entries:
            value = entries[DEFAULT]
            if isinstance(value, float):
                return value
            if m:  # the blocks in model order: one group after another
                return _along(value, blocks.position(m[1], int(m[2])), blocks.depth())
            return value[-1] if block in blocks.family.final_blocks else value[0]
        raise ValueError(f"gives no value for {block or f'a key outside the {blocks.family.name} blocks'}")

    def numbers(self) -> list[float]:
        """Every number the schedule holds: any value it gives lies between two of them."""
        return [n for _, v in self.entries for n in (v if isinstance(v, tuple) else (v,))]

    def plain(self) -> list | dict:
        """As a recipe would write it (JSON-able): a list, or a mapping of flat block names."""
        if len(self.entries) == 1 and self.entries[0][0] == DEFAULT and isinstance(self.entries[0][1], tuple):
            return list(self.entries[0][1])
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.entries}

    def __str__(self) -> str:
        return _text(self.plain())


def _along(value: float | tuple[float, ...], index: int, length: int) -> float:
    """A gradient's value at position `index` of `length` positions (anchors spread evenly), or a number."""
    if isinstance(value, float):
        return value
    if length <= 1:
        return value[0]
    segment, rest = divmod(index * (len(value) - 1), length - 1)
    if segment >= len(value) - 1:
        return value[-1]
    a, b = value[segment], value[segment + 1]
    return a + (b - a) * (rest / (length - 1))


# --- recipe time -----------------------------------------------------------------------------------------


def parse(value: Any) -> float | Schedule:
    """A number, or a schedule checked for all that needs no model; a ValueError says what is wrong."""
    if is_number(value):
        return float(value)
    if isinstance(value, (list, tuple)):
        return Schedule(((DEFAULT, _gradient(value, "a list")),))
    if isinstance(value, dict):
        entries: dict[str, Any] = {}
        for name, item in value.items():
            _add(str(name), item, entries)
        if not entries:
            raise ValueError("an empty mapping gives no value to any block")
        _check_ranges(entries)
        order = {name: i for i, name in enumerate(NAMES)}
        return Schedule(tuple(sorted(entries.items(), key=lambda e: _rank(e[0], order))))
    raise ValueError(f"must be a number, a list of numbers (a gradient over the blocks) or a mapping of block names to numbers, got {value!r}")


def is_schedule_like(value: Any) -> bool:
    """Whether a value has a schedule's shape (numbers in a list, or in a mapping, nested at most once), to
    tell a malformed schedule from something else altogether (a mistyped recipe field)."""
    if isinstance(value, (list, tuple)):
        return bool(value) and all(is_number(v) for v in value)
    return isinstance(value, dict) and bool(value) and all(is_number(v) or is_schedule_like(v) for v in value.values())


def _add(name: str, item: Any, entries: dict[str, Any]) -> None:
    if isinstance(item, dict) and name not in GROUPS and any(n.startswith(name + ".") for n in NAMES):
        for part, value in item.items():  # {A: {B: ...}} for a block or group A.B: a dotted name, nested as Hydra nests it
            _add(f"{name}.{part}", value, entries)
        return
    if name in GROUPS and isinstance(item, dict):  # {GROUP: {default: ..., 7: 0.5}}: blocks under their group
        for index, number in item.items():
            if str(index) == DEFAULT:
                _add(name, number, entries)
                continue
            if not re.fullmatch(r"\d+(-\d+)?", str(index)):
                raise ValueError(f"under '{name}', name blocks by their number or a range of them ({name}: {{default: ..., 0: ..., 7: ..., 10-18: ...}}), got {str(index)!r}")
            _add(f"{name}.{index}", number, entries)
        return
    m, span = INDEXED.fullmatch(name), RANGE.fullmatch(name)
    if m:
        name = f"{m[1]}.{int(m[2])}"
    elif span:
        if int(span[2]) > int(span[3]):
            raise ValueError(f"'{name}': a range runs from the lower block to the higher ({span[1]}.{int(span[3])}-{int(span[2])})")
        name = f"{span[1]}.{int(span[2])}-{int(span[3])}"
    elif name not in NAMES:
        indexed = ", ".join(f"{g}.N" for g in GROUPS)
        raise ValueError(f"{name!r} is not a FLUX block name{_suggestion(name)} (names: {', '.join(NAMES[1:])}, {indexed}, default)")
    if name in entries:
        raise ValueError(f"'{name}' is given twice")
    if isinstance(item, (list, tuple)):
        if name not in GROUPS and name != DEFAULT and not span:
            raise ValueError(f"'{name}' is one block: give it a number (a list is a gradient over {', '.join(GROUPS)}, a range of blocks or default)")
        entries[name] = _gradient(item, f"the list under '{name}'")
    elif is_number(item):
        entries[name] = float(item)
    else:
        raise ValueError(f"'{name}' must be a number" + (" or a list of numbers" if name in GROUPS or name == DEFAULT else "") + f", got {item!r}")


def _check_ranges(entries: dict[str, Any]) -> None:
    """Two ranges of one group that overlap must differ in width: the narrower one decides the blocks they share."""
    spans = [(name, m[1], int(m[2]), int(m[3])) for name in entries if (m := RANGE.fullmatch(name))]
    for i, (a, group, first, last) in enumerate(spans):
        for b, other, start, stop in spans[i + 1:]:
            if group == other and first <= stop and start <= last and last - first == stop - start:
                raise ValueError(f"'{a}' and '{b}' overlap and are as wide, so neither is more specific: name the blocks they share")


def _gradient(items: list | tuple, what: str) -> tuple[float, ...]:
    if not all(is_number(v) for v in items):
        raise ValueError(f"{what} must hold numbers only, got {list(items)!r}")
    if len(items) < 2:
        raise ValueError(f"{what} is a gradient over the blocks and needs 2 or more numbers, got {list(items)!r} (for one value, give the number)")
    return tuple(float(v) for v in items)


def _suggestion(name: str) -> str:
    stem, dot, index = name.rpartition(".") if re.search(r"\.\d+$", name) else (name, "", "")
    close = difflib.get_close_matches(stem, GROUPS if index else NAMES, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}{dot}{index}'?)" if close else ""


def _rank(name: str, order: dict[str, int]) -> tuple[int, int, int]:
    m, span = INDEXED.fullmatch(name), RANGE.fullmatch(name)
    if span:
        return order[span[1]], int(span[2]) + 1, int(span[3]) + 1
    return (order[m[1]], int(m[2]) + 1, int(m[2]) + 1) if m else (order[name], 0, 0)


def is_number(v: Any) -> bool:
    """A finite real number as a recipe writes one (YAML's true is not 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return number_text(value) if isinstance(value, float) else str(value)


def number_text(value: float) -> str:
    """A value as plans print it: 6 significant digits, and a float looks like one (1.0, not 1)."""
    text = f"{value:.6g}"
    return text + ".0" if text.lstrip("-").isdigit() else text


def addressable(value: Any) -> Any:
    """A schedule in the shape Hydra can override one block of (`recipe.alpha.GROUP.7=V`): mapping
    keys as strings (YAML reads `7:` as an int, Hydra looks up '7'), and a gradient, or a group's gradient or
    number, moved under `default` (`[0, 1]` -> `{default: [0, 1]}`), so that `.7` names block 7 rather than
    a list position or a child of a number. The meaning is the same; what is malformed is left for parse()
    to name as written."""
    if _gradient_like(value):
        return {DEFAULT: value}
    if isinstance(value, dict):
        value = string_keys(value)
        return {k: {DEFAULT: v} if k in GROUPS and (is_number(v) or _gradient_like(v)) else v for k, v in value.items()}
    return value


def _gradient_like(value: Any) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(is_number(v) for v in value)


def string_keys(value: Any) -> Any:
    """The same data with every mapping key a string: YAML reads `7:` as the integer 7, but Hydra's
    `recipe.alpha.GROUP.7=...` looks up the string '7'."""
    if isinstance(value, dict):
        return {str(k) if isinstance(k, int) and not isinstance(k, bool) else k: string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [string_keys(v) for v in value]
    return value


# --- plan time -------------------------------------------------------------------------------------------


def check_against(value: Any, keys: Iterable[str], blocks: Blocks) -> None:
    """A schedule against a model with `blocks`, for the canonical `keys` it decides: every block it names
    exists in the model (its family has the name, its group the index), and every key gets a value. A
    ValueError names the first fault; a number always fits."""
    if not isinstance(value, Schedule):
        return
    family = blocks.family
    known = (*family.top_blocks, *family.groups, *family.final_blocks)
    for name, _ in value.entries:
        m = INDEXED.fullmatch(name) or RANGE.fullmatch(name)
        if m and m[1] in family.groups and int(m[m.lastindex]) >= blocks.count(m[1]):
            have = f"{m[1]}.0..{blocks.count(m[1]) - 1}" if blocks.count(m[1]) else f"no {m[1]}"
            raise ValueError(f"names {name}, but the model has {have}")
        if name != DEFAULT and (m[1] if m else name) not in known:
            raise ValueError(f"names {name}, which a {family.name} model does not have (its blocks: {blocks.names()})")
    missing: dict[str, str] = {}
    for key in keys:
        block = family.block_of(key) or key
        if block not in missing:
            try:
                value.at(family.block_of(key), blocks)
            except ValueError:
                missing[block] = key
    if missing:
        missing = dict(sorted(missing.items(), key=lambda item: family.block_order(item[0])))
        shown = ", ".join(list(missing)[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"gives no value for {shown} (e.g. key '{cut(next(iter(missing.values())))}'): name them, or add a default")


def value_for(value: float | Schedule, key: str, blocks: Blocks) -> float:
    """The number a parameter gives canonical key `key` of a model with `blocks`: the number itself, or the
    schedule's value for the key's block (check_against first: a key it does not cover is a ValueError)."""
    if isinstance(value, Schedule):
        return value.at(blocks.family.block_of(key), blocks)
    return value


def resolve(params: dict[str, Any], key: str, blocks: Blocks) -> tuple[tuple[str, Any], ...]:
    """An op's checked parameters with every schedule (also inside a list of weights) turned into the
    number for `key`: what a plan step holds."""

    def one(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(one(v) for v in value)
        return value_for(value, key, blocks) if isinstance(value, Schedule) else value

    return tuple((name, one(value)) for name, value in params.items())


def schedules_in(value: Any) -> list[Schedule]:
    """The schedules a parameter value holds: itself, or those in its list of weights."""
    if isinstance(value, Schedule):
        return [value]
    return [v for v in value if isinstance(v, Schedule)] if isinstance(value, tuple) else []


def plain(value: Any) -> Any:
    """A parameter value as JSON-able data (schedules as written, normalised)."""
    if isinstance(value, Schedule):
        return value.plain()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value
