"""The op registry: an op is one declared function whose signature is its schema.

    @op(inputs=(2, 2), formula="(1 - alpha) * x1 + alpha * x2", shorthand=("alpha",))
    def lerp(xs: list[Tensor], alpha: float) -> Tensor: ...

The parameters after `xs` are the op's recipe parameters: their annotations give their kinds (float: a
number, list[float]: one number per input, TaskWeights: one number per source after the first (per task
vector), int: an integer, Source: a source name, a Literal: one of its values) and their defaults are the
defaults (a trailing `_` is dropped: `lambda_` is written `lambda`). A number may be a per-block schedule
(schedule.py), also each number of a list: the plan gives every key its own plain number.
Two more names are passed by the executor when an op declares them: `where` (which elements of which
tensor this call computes: for counter-based randomness) and `stats` (the results of the op's statistics
passes over the whole tensor, for slerp's angle or TIES' threshold).

A recipe writes an op as a mapping, `{lerp: {alpha: 0.3}}`, or as shorthand, `lerp:0.3`, whose values fill
the op's `shorthand` parameters in order. Parsing needs no torch: planning and dry runs never import it.

One module of some 400 lines: the declaration, the parsing and checking of a recipe's op, and the listing
(`fluxrecipe methods`) all read the same OpSpec and Param; apart, each would restate what a parameter kind
means.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, NewType

from .. import schedule
from ..text import counted

Source = NewType("Source", str)  # a parameter that names one of the recipe's sources
TaskWeights = NewType("TaskWeights", tuple)  # one number per source after the first: a weight per task vector
REQUIRED: Any = inspect.Parameter.empty
INJECTED = ("where", "stats")


@dataclass(frozen=True)
class Where:
    """Which elements a call computes: elements [start, stop) of canonical tensor `key`, read from `sources`."""

    key: str
    start: int
    stop: int
    sources: tuple[str, ...]
    total: int | None = None  # the tensor's elements (None: it ends at `stop`); sums over fixed segments need it


@dataclass(frozen=True)
class StatPass:
    """A statistic of the whole tensor, gathered before the element-wise pass. `partial(xs, where, stats,
    params)` runs in a worker on a chunk (the inputs in float32, their Where, the results of the passes
    before it, the step's parameters); `fold(state, partial)` combines the partials in the main thread,
    chunks in element order, starting from None; `result(state, params)` turns the fold into the statistic
    the op receives. The statistic must not depend on how the tensor was chunked: sums go through
    segments.py. `needed(stats)`, where given, says from the passes before it whether this one must run (a
    pass that is skipped reads nothing and adds no result: the op finds its statistic in an earlier one)."""

    partial: Callable[..., Any]  # (xs, where, stats, params) -> a partial
    fold: Callable[[Any, Any], Any]  # (state or None, partial) -> state
    result: Callable[[Any, dict[str, Any]], Any]  # (state, params) -> the statistic
    needed: Callable[[tuple], bool] | None = None  # (the results of the passes before) -> whether to run


@dataclass(frozen=True)
class Param:
    name: str  # as a recipe writes it
    kind: str  # "number", "numbers" (one per input), "task_weights" (one per task vector), "integer", "source", "choice"
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def usage(self) -> str:
        value = {"number": "NUMBER", "numbers": "[N1, N2, ...]", "task_weights": "[W2, W3, ...]", "integer": "INTEGER", "source": "SOURCE"}.get(self.kind, "|".join(self.choices))
        return f"{self.name}: {value}" + ("" if self.required else f" (default {_show(self.default, self.kind)})")


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable[..., Any]
    inputs: tuple[int, int | None]  # fewest and most sources (None: any number)
    params: tuple[Param, ...]
    formula: str
    shorthand: tuple[str, ...]  # parameters that `name:v1,v2` fills, in order
    passes: tuple[StatPass, ...] = ()
    # A fault of the values (numbers: one value per schedule), or None. Checks are bounds, so that a
    # schedule whose numbers pass gives only values that pass: interpolation stays between its numbers.
    check: Callable[[dict[str, Any], int], str | None] | None = None
    summary: str = ""
    arguments: tuple[tuple[str, str], ...] = ()  # recipe name -> the function's name, where they differ (lambda -> lambda_)
    # What the plan and the executor treat specially, declared by the op, never tested by its name:
    identity: bool = False  # returns its one input unchanged (its bytes are copied where the dtype stays)
    writes: bool = True  # False: the key is not written at all (never executed)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def usage(self) -> str:
        """`lerp:ALPHA`, `take:SOURCE`, `average`: the shorthand, as error messages show it."""
        if not self.shorthand:
            return self.name
        kinds = [self.param(n) for n in self.shorthand]
        return self.name + ":" + ",".join({"numbers": "W1,W2,...", "source": "NAME"}.get(p.kind, p.name.upper()) for p in kinds)

    @property
    def source_param(self) -> str | None:
        """The parameter that names the op's one source (`take:NAME`), if it chooses its source itself."""
        return next((p.name for p in self.params if p.kind == "source"), None)

    @property
    def over_rule_sources(self) -> bool:
        """Whether its inputs are the rule's sources (not one it names, nor none)."""
        return self.source_param is None and self.inputs != (0, 0)

    def wants(self, name: str) -> bool:
        """Whether the function takes `name` (`where`, `stats`): asked per chunk, so read once."""
        return name in self._arguments

    @functools.cached_property
    def _arguments(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.fn).parameters)

    def call(self, xs: list[Any], values: dict[str, Any]) -> Any:
        """The op on `xs` with its parameters (and injected `where`/`stats`) by their recipe names."""
        renamed = dict(self.arguments)
        return self.fn(xs, **{renamed.get(k, k): v for k, v in values.items()})


OPS: dict[str, OpSpec] = {}


def identity_of(source: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The op and parameters that take `source`'s tensor unchanged: what a plan gives a key a rule's op cannot
    compute (mix_families: a tensor the other family lacks)."""
    spec = next(s for s in OPS.values() if s.identity)
    return spec.name, ((spec.source_param, source),)


def op(*, inputs: tuple[int, int | None], formula: str, shorthand: tuple[str, ...] = (), passes: tuple[StatPass, ...] = (), check=None, identity: bool = False, writes: bool = True):
    """Register the decorated function as an op named after it (a trailing `_` dropped)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__.rstrip("_")
        params = tuple(
            _param(p.name.rstrip("_"), _annotation(fn, p), p.default)
            for p in list(inspect.signature(fn).parameters.values())[1:]
            if p.name not in INJECTED
        )
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        renamed = tuple((p.rstrip("_"), p) for p in inspect.signature(fn).parameters if p.endswith("_"))
        OPS[name] = OpSpec(name, fn, inputs, params, formula, shorthand, passes, check, summary, renamed, identity, writes)
        return fn

    return register


def _annotation(fn: Callable[..., Any], parameter: inspect.Parameter) -> Any:
    """A parameter's annotation, evaluated in its module (annotations are strings under `from __future__`)."""
    hint = parameter.annotation
    return eval(hint, fn.__globals__) if isinstance(hint, str) else hint  # noqa: S307 - our own source code


def _param(name: str, hint: Any, default: Any) -> Param:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `list[float] | None`: None stands for a default per input
        hint = next(h for h in typing.get_args(hint) if h is not type(None))
    if hint is Source:
        return Param(name, "source", default)
    if hint is TaskWeights:
        return Param(name, "task_weights", default)
    if typing.get_origin(hint) is Literal:
        return Param(name, "choice", default, tuple(typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return Param(name, "numbers", default)
    kind = {float: "number", int: "integer"}.get(hint)
    if kind is None:
        raise TypeError(f"op parameter {name}: unsupported annotation {hint!r}")
    return Param(name, kind, default)


def _show(value: Any, kind: str) -> str:
    if value is None:
        return "1 for each source after the first" if kind == "task_weights" else "one per source, 1 each"
    return str(value)


@dataclass(frozen=True)
class OpCall:
    """An op as a recipe wrote it, parsed: `lerp:0.3` or `{lerp: {alpha: 0.3}}` -> OpCall("lerp", {"alpha": 0.3}).

    Values are as written: numbers, lists, source names, or (for schedules) what the recipe gave; the plan
    resolves them per key."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> OpSpec:
        return OPS[self.name]

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        """The shorthand (`lerp:0.3`) where the values allow it, else the mapping (`ties{density: 0.2, ...}`)."""
        args = _shorthand_args(self.spec, self.values)
        if args is not None:
            return self.name + (":" + ",".join(args) if args else "")
        return self.name + "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in self.params) + "}"


def _shorthand_args(spec: OpSpec, values: dict[str, Any]) -> list[str] | None:
    """The values as `name:v1,v2` writes them, or None when shorthand cannot say them."""
    if list(values) != list(spec.shorthand[: len(values)]):
        return None
    args = []
    for name, value in values.items():
        if spec.param(name).kind == "numbers" and isinstance(value, (list, tuple)) and all(_scalar(v) for v in value):
            args += [_fmt(v) for v in value]
        elif _scalar(value):
            args.append(_fmt(value))
        else:
            return None
    return args


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):  # a per-block schedule: its first names, enough to recognise it in a message
        text = "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
        return text if len(text) <= 60 else text[:52].rsplit(", ", 1)[0] + ", ...}"
    return str(value)


def parse_op(value: Any) -> OpCall:
    """Parse an op as a recipe writes it; a ValueError says what is wrong, for the caller to place."""
    if isinstance(value, dict):
        if len(value) != 1:
            raise ValueError(f"an op mapping names one op, as {{lerp: {{alpha: 0.3}}}}; got {len(value)} keys ({', '.join(map(str, value))})")
        (name, params), = value.items()
        spec = _spec(str(name))
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"{name}: its parameters are a mapping, as {{{name}: {{{', '.join(p.name + ': ...' for p in spec.params) or ''}}}}}, got {params!r}")
        for key in params:
            if spec.param(str(key)) is None:
                known = [p.name for p in spec.params]
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"{name}: unknown parameter {key!r} ({hint}parameters: {', '.join(known) or 'none'})")
        return OpCall(spec.name, tuple((str(k), v) for k, v in params.items()))
    name, _, rest = str(value).strip().partition(":")
    spec = _spec(name.strip())
    parts = [p.strip() for p in rest.split(",")] if rest.strip() else []
    if not spec.shorthand:
        if parts:
            raise ValueError(f"{spec.name} takes no argument, got {rest.strip()!r} (usage: {spec.usage})")
        return OpCall(spec.name)
    if not parts:
        if any(spec.param(n).required for n in spec.shorthand):
            raise ValueError(f"{spec.name} needs an argument (usage: {spec.usage})")
        return OpCall(spec.name)
    first = spec.param(spec.shorthand[0])
    if first.kind == "source":
        if len(parts) != 1 or not parts[0]:
            raise ValueError(f"{spec.name} takes one source name, got {rest.strip()!r} (usage: {spec.usage})")
        return OpCall(spec.name, ((first.name, parts[0]),))
    numbers = [_number(p, spec.usage) for p in parts]
    if first.kind == "numbers":
        return OpCall(spec.name, ((first.name, tuple(numbers)),))
    if len(numbers) > len(spec.shorthand):
        raise ValueError(f"{spec.name} takes {_count(len(spec.shorthand))}, got {len(numbers)} (usage: {spec.usage})")
    return OpCall(spec.name, tuple(zip(spec.shorthand, numbers)))


def _count(n: int) -> str:
    return "one number" if n == 1 else f"at most {n} numbers"


def _spec(name: str) -> OpSpec:
    if name not in OPS:
        close = difflib.get_close_matches(name, OPS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown op {name!r} ({hint}ops: {', '.join(spec.usage for spec in OPS.values())}; python -m fluxrecipe methods describes them)")
    return OPS[name]


def _number(text: str, usage: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number (usage: {usage})") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number (usage: {usage})")
    return value


def check_values(spec: OpSpec, values: dict[str, Any], sources: tuple[str, ...], label: str | None = None) -> dict[str, Any]:
    """Every parameter of `spec` given a value of its kind (defaults filled in) for a rule over `sources`;
    a ValueError names what is missing or wrong (`label`: the op as the recipe wrote it)."""
    inputs, label = len(sources), label or spec.name
    resolved = {}
    for param in spec.params:
        if param.name not in values:
            if param.required:
                raise ValueError(f"{spec.name}: missing parameter '{param.name}' ({param.usage()})")
            resolved[param.name] = param.default
            continue
        resolved[param.name] = _checked(spec, param, values[param.name], sources, label)
    for sample in _samples(resolved) if spec.check else ():
        fault = spec.check(sample, inputs)
        if fault:
            raise ValueError(f"{spec.name}: {fault}")
    return resolved


def _samples(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The values with plain numbers for the op's check: each schedule's every number in turn (the others at
    their first); one sample when there is no schedule."""

    def first(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(first(v) for v in value)
        return value.numbers()[0] if isinstance(value, schedule.Schedule) else value

    base = {k: first(v) for k, v in values.items()}
    samples = [{**base, name: n} for name, v in values.items() if isinstance(v, schedule.Schedule) for n in v.numbers()]
    return samples or [base]


def _checked(spec: OpSpec, param: Param, value: Any, sources: tuple[str, ...], label: str) -> Any:
    where = f"{spec.name}: parameter '{param.name}'"
    if param.kind == "number":
        return _number_or_schedule(value, where)
    if param.kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where} must be a whole number, got {value!r}")
        return value
    if param.kind in ("numbers", "task_weights"):
        per_task = param.kind == "task_weights"
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list of numbers, one per source{' after the first' if per_task else ''}, got {value!r}")
        wanted = sources[1:] if per_task else sources
        if len(value) != len(wanted):
            what = param.name if param.name == "weights" else "numbers"
            if per_task:
                raise ValueError(f"{label} gives {len(value)} {what} for {len(wanted)} task vectors (the sources after the base '{sources[0]}': {', '.join(wanted)})")
            raise ValueError(f"{label} gives {len(value)} {what} for {len(sources)} sources ({', '.join(sources)})")
        return tuple(_number_or_schedule(v, f"{where}[{i}]") for i, v in enumerate(value))
    if param.kind == "choice":
        if value not in param.choices:
            raise ValueError(f"{where} must be one of {', '.join(param.choices)}, got {value!r}")
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a source name, got {value!r}")
    return value


def _number_or_schedule(value: Any, where: str) -> float | schedule.Schedule:
    if isinstance(value, (list, tuple, dict)):
        try:
            return schedule.parse(value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if not schedule.is_number(value):
        raise ValueError(f"{where} must be a finite number (or a per-block schedule), got {value!r}")
    return float(value)


def block_names() -> str:
    """Every family's block names as a schedule takes them: the blocks before the groups, each group as
    'GROUP[.N]', the blocks after them, 'default'."""
    from ..schedule import FINAL, GROUPS, TOP

    return ", ".join([*TOP, *(f"{g}[.N]" for g in GROUPS), *FINAL, "default"])


def listing(names: list[str] | None = None) -> str:
    """Every op (or the named ones) with its sources, parameters and formula: `python -m fluxrecipe methods`."""
    lines = [
        "Merge methods (ops). A rule writes one as shorthand, `op: lerp:0.3`, or as a mapping, `op: {ties: {density: 0.2}}`.",
        "x1, x2, ... are the rule's sources in order (its `sources:`, else the recipe's); base = x1, tau_i = x_i - base.",
        "All arithmetic is float32, rounded once to the output dtype; statistics are exact or float64.",
        "Any NUMBER may be a per-block schedule: a list (a gradient over the blocks) or a mapping of block names",
        f"({block_names()}).",
    ]
    for spec in (OPS[n] for n in names or OPS):
        fewest, most = spec.inputs
        sources = "no source" if most == 0 else counted(fewest, "source") if fewest == most else f"{fewest} or more sources" if most is None else f"{fewest} to {most} sources"
        lines += ["", f"{spec.usage}  ({sources})", f"    {spec.summary}", f"    = {spec.formula}"]
        lines += [f"    {p.usage()}" for p in spec.params]
    return "\n".join(lines)
