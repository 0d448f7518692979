"""Rules x keys -> a Plan: one step per output key. Every check runs here, before any tensor byte is read.

The plan is plain data: which rule decided each key, which source tensors feed it (file, byte range, dtype,
shape), what is dropped and why, how the output is sharded, and the config.json the output will carry. It
can be printed (`dry_run=true`) and tested without touching a tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from .architecture import config_fields, expected_parameters, mismatch
from .errors import PlanError
from .ops import OpCall
from .recipe import Recipe, Rule
from .sources import Checkpoint, TensorLoc
from .st_format import ITEMSIZE
from .text import printable

SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHOWN = 6  # how many keys a message lists before it says "and N more"
MAX_HINT = 200  # characters: a suggested rule longer than this would be no help (it would list the keys)


@dataclass(frozen=True)
class Step:
    """One output tensor: the rule that decided it, its inputs in order, its dtype and shape."""

    key: str
    rule: int
    op: OpCall
    inputs: tuple[TensorLoc, ...]
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def copies_bytes(self) -> bool:
        """`take` into the same dtype: the bytes are copied as they are, never decoded."""
        return self.op.name == "take" and self.inputs[0].dtype == self.dtype


@dataclass(frozen=True)
class Shard:
    file: str
    steps: tuple[Step, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.steps)


@dataclass(frozen=True)
class Dropped:
    key: str
    reason: str
    rule: int | None = None  # the drop rule, when a rule dropped it


@dataclass(frozen=True)
class SourceSummary:
    name: str
    spec: str
    origin: dict[str, str]
    folder: str
    tensors: int
    nbytes: int
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class RuleStats:
    rule: Rule
    keys: int
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    sources: tuple[SourceSummary, ...]
    shards: tuple[Shard, ...]
    dropped: tuple[Dropped, ...]
    config: dict[str, Any]
    notes: tuple[str, ...]

    @property
    def steps(self) -> list[Step]:
        return [s for shard in self.shards for s in shard.steps]

    @property
    def bytes_read(self) -> int:
        return sum(t.nbytes for s in self.steps for t in s.inputs)

    @property
    def bytes_written(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def rule_stats(self) -> list[RuleStats]:
        keys, read, written = Counter(), Counter(), Counter()
        for s in self.steps:
            keys[s.rule] += 1
            read[s.rule] += sum(t.nbytes for t in s.inputs)
            written[s.rule] += s.nbytes
        keys.update(d.rule for d in self.dropped if d.rule is not None)
        return [RuleStats(r, keys[r.index], read[r.index], written[r.index]) for r in self.recipe.rules]


def make_plan(recipe: Recipe, checkpoints: dict[str, Checkpoint], shard_size: int) -> Plan:
    """Decide every output key; raises PlanError when recipe and sources do not fit together."""
    base = checkpoints[recipe.base]
    if base.config is None:
        raise PlanError(f"base '{recipe.base}' ({base.folder}) has no config.json: the output needs one, so the base must be a diffusers folder or repo")
    config = _output_config(recipe, base)

    decided: dict[str, Rule] = {}
    for key in base.tensors:
        rule = next((r for r in recipe.rules if r.matches(key)), None)
        if rule is None:
            raise PlanError(
                f"key '{key}' of base '{recipe.base}' matches no rule of recipe '{recipe.name}': "
                "every key needs one; end the rules with a catch-all {match: '.*', op: ...}"
            )
        decided[key] = rule
    _check_every_rule_used(recipe, checkpoints, decided)

    steps, dropped = [], []
    for key, rule in decided.items():
        if rule.op.name == "drop":
            dropped.append(Dropped(key, f"dropped by {rule.describe()}", rule.index))
            continue
        inputs = _inputs(rule, key, checkpoints, recipe.base, decided)
        steps.append(Step(key, rule.index, rule.op, inputs, recipe.dtype, base.tensors[key].shape))
    dropped += _not_in_base(recipe, checkpoints)
    _check_fits_config(recipe, config, steps)

    return Plan(
        recipe=recipe,
        sources=tuple(_summary(recipe, c) for c in checkpoints.values()),
        shards=_shards(steps, shard_size),
        dropped=tuple(dropped),
        config=config,
        notes=tuple(_notes(recipe, steps)),
    )


def _output_config(recipe: Recipe, base: Checkpoint) -> dict[str, Any]:
    where = f"base '{recipe.base}' ({base.folder}/config.json)"
    if recipe.config:
        allowed = config_fields(base.config, where)
        unknown = sorted(set(recipe.config) - allowed)
        if unknown:
            raise PlanError(f"recipe '{recipe.name}' config: {', '.join(unknown)} not a field of {base.config.get('_class_name')} (fields: {', '.join(sorted(allowed))})")
    return {**base.config, **recipe.config}


def _check_every_rule_used(recipe: Recipe, checkpoints: dict[str, Checkpoint], decided: dict[str, Rule]) -> None:
    used = {r.index for r in decided.values()}
    for rule in recipe.rules:
        if rule.index in used or rule.optional:
            continue
        base_hits = [k for k in checkpoints[recipe.base].tensors if rule.matches(k)]
        if base_hits:
            why = f"every key it matches ({some_keys(base_hits)}) is taken by an earlier rule"
        else:
            why = f"it matches no key of the base '{recipe.base}'"
            elsewhere = {n: sum(rule.matches(k) for k in c.tensors) for n, c in checkpoints.items() if n != recipe.base}
            hits = ", ".join(f"{count} of {n}" for n, count in elsewhere.items() if count)
            if hits:
                why += f" (it matches {hits}; the output has only the base's keys)"
        raise PlanError(f"{rule.where} (match {rule.match!r}) decides no key: {why}. A typo? If intended, mark the rule `optional: true`")


def _inputs(rule: Rule, key: str, checkpoints: dict[str, Checkpoint], base: str, decided: dict[str, Rule]) -> tuple[TensorLoc, ...]:
    shape = checkpoints[base].tensors[key].shape
    inputs = []
    for name in rule.sources:
        loc = checkpoints[name].tensors.get(key)
        if loc is None:
            raise PlanError(_missing_input(rule, name, checkpoints, base, decided))
        if loc.shape != shape:
            raise PlanError(f"{rule.where} ({rule.op}): '{key}' is {list(shape)} in base '{base}' but {list(loc.shape)} in '{name}' ({loc.file})")
        inputs.append(loc)
    return tuple(inputs)


def _missing_input(rule: Rule, name: str, checkpoints: dict[str, Checkpoint], base: str, decided: dict[str, Rule]) -> str:
    """Why a rule cannot have its inputs from source `name`, and the rule that would fix it, if one short rule
    can: a source that lacks most of the base's keys is another kind of model (a LoRA, another architecture)."""
    source = checkpoints[name]
    lacking = [k for k, r in decided.items() if r is rule and k not in source.tensors]
    where = f"{rule.where} ({rule.op}) needs {some_keys(lacking)} from source '{name}', which lacks {'it' if len(lacking) == 1 else 'them'} ({source.folder})"
    shared = sum(k in source.tensors for k in checkpoints[base].tensors)
    if shared * 2 < len(checkpoints[base].tensors):
        return (
            f"{where}: '{name}' holds {len(source.tensors)} tensors and shares only {shared} of the {len(checkpoints[base].tensors)} keys "
            f"of base '{base}' (e.g. '{next(iter(source.tensors))}'): it is not a model of the base's kind (a LoRA, or another architecture?); "
            "fluxrecipe merges whole FLUX transformers in the diffusers layout"
        )
    lacking_set = set(lacking)
    others = [k for k, r in decided.items() if r.index >= rule.index and k not in lacking_set]
    hint = _hint_pattern(lacking, others)
    if len(hint) > MAX_HINT:
        return f"{where}: add a rule before it that takes these {len(lacking)} keys from another source"
    return f"{where}: add a rule before it for these keys, e.g. {{match: '{hint}', op: 'take:{base}'}}"


def _hint_pattern(keys: list[str], others: list[str]) -> str:
    """A regex for the error's example rule: it matches every one of `keys` and none of `others` (the keys a rule
    placed just before the failing one must leave alone). A shared name part where one fits (the guidance
    embedder, typically), else the keys' common prefix, else the keys themselves."""

    def fits(pattern: str) -> bool:
        rx = re.compile(pattern)
        return all(rx.search(k) for k in keys) and not any(rx.search(k) for k in others)

    parts = keys[0].split(".")
    shared = {p for p in parts if all(p in k.split(".") for k in keys) and not p.isdigit() and p not in ("weight", "bias")}
    candidates = sorted(shared, key=lambda p: (-len(p), p))
    prefix = os.path.commonprefix(keys)
    prefix = prefix[: prefix.rfind(".") + 1] if len(keys) > 1 else keys[0]
    if prefix:
        candidates.append("^" + re.escape(prefix) + ("$" if prefix == keys[0] and len(keys) == 1 else ""))
    return next((c for c in candidates if fits(c)), "^(?:" + "|".join(re.escape(k) for k in keys) + ")$")


def _not_in_base(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[Dropped]:
    base_keys = checkpoints[recipe.base].tensors
    dropped: dict[str, list[str]] = defaultdict(list)
    for name, c in checkpoints.items():
        for key in c.tensors:
            if key not in base_keys:
                dropped[key].append(name)
    return [Dropped(k, f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} it, base '{recipe.base}' lacks it") for k, names in dropped.items()]


def _check_fits_config(recipe: Recipe, config: dict[str, Any], steps: list[Step]) -> None:
    """The output's keys and shapes must be exactly what diffusers builds from its config.json."""
    where = f"the output's config.json (from base '{recipe.base}'" + (" with the recipe's config overrides)" if recipe.config else ")")
    expected = expected_parameters(config, where)
    have = {s.key: s.shape for s in steps}
    found = mismatch(expected, have)
    if not found:
        return
    missing, unexpected, wrong = found.missing, found.unexpected, found.wrong
    problems = []
    if missing:
        problems.append(f"it lacks {len(missing)} key(s) the config needs ({some_keys(missing)})")
    if unexpected:
        problems.append(f"it holds {len(unexpected)} key(s) the config has no place for ({some_keys(unexpected)})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} key(s) have other shapes than the config implies ('{k}' is {list(have[k])}, the config says {list(expected[k])})")
    hint = ""
    guidance = config.get("guidance_embeds")
    if any("guidance" in k for k in missing) and guidance:
        hint = (
            " The config says guidance_embeds: true but the guidance embedder is not written: make a source that has it the base and "
            "`take` its guidance keys, or drop them and set `config: {guidance_embeds: false}`."
        )
    elif any("guidance" in k for k in unexpected) and not guidance:
        hint = " The config says guidance_embeds: false: drop the guidance keys (`{match: guidance, op: drop}`) or set `config: {guidance_embeds: true}`."
    raise PlanError(f"recipe '{recipe.name}': the output would not load as {config.get('_class_name')}: " + "; ".join(problems) + "." + hint)


def _shards(steps: list[Step], shard_size: int) -> tuple[Shard, ...]:
    groups: list[list[Step]] = [[]]
    size = 0
    for step in steps:
        if groups[-1] and size + step.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(step)
        size += step.nbytes
    return tuple(Shard(SHARD_NAME.format(index=i + 1, count=len(groups)), tuple(g)) for i, g in enumerate(groups))


def _summary(recipe: Recipe, c: Checkpoint) -> SourceSummary:
    dtypes = tuple(sorted({t.dtype for t in c.tensors.values()}))
    return SourceSummary(c.name, recipe.sources[c.name].describe(), c.origin, c.folder, len(c.tensors), c.nbytes, dtypes)


def _notes(recipe: Recipe, steps: list[Step]) -> list[str]:
    notes = []
    for rule in recipe.rules:
        if rule.op.name == "lerp" and not 0.0 <= rule.op.args[0] <= 1.0:
            notes.append(f"{rule.describe()} extrapolates: A = {rule.op.args[0]} lies outside [0, 1]")
    read = sorted({(t.source, t.dtype) for s in steps for t in s.inputs})
    if {d for _, d in read} != {recipe.dtype}:
        held = ", ".join(f"{src} {d}" for src, d in read)
        notes.append(f"inputs hold {held}; all arithmetic is float32, rounded once to {recipe.dtype}")
    return notes


def some_keys(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:SHOWN])
    return shown + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def format_plan(plan: Plan) -> str:
    """The plan as a person reads it: sources, per-rule counts and bytes, drops, totals, notes."""
    r = plan.recipe
    lines = [f"recipe {r.name}" + (f" ({r.file})" if r.file else "")]
    if r.description:
        lines.append(f"  {r.description}")
    if r.params:
        lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in r.params.items()))
    lines.append("sources:")
    for s in plan.sources:
        where = ", ".join(f"{k} {v}" for k, v in s.origin.items())
        mark = "  (base)" if s.name == r.base else ""
        lines.append(f"  {s.name:<12} {s.spec}{mark}")
        lines.append(f"  {'':<12} {s.tensors} tensors, {human_bytes(s.nbytes)}, {'/'.join(s.dtypes)}; {where}")
        lines.append(f"  {'':<12} {s.folder}")
    guidance = json.dumps(plan.config.get("guidance_embeds"))
    lines.append(f"output: {r.base}'s architecture ({plan.config.get('_class_name')}, guidance_embeds: {guidance})")
    lines.append("rules:")
    width = max(len(repr(x.rule.match)) for x in plan.rule_stats())
    for x in plan.rule_stats():
        src = f" over {', '.join(x.rule.sources)}" if x.rule.op.name not in ("take", "drop") else ""
        lines.append(
            f"  [{x.rule.index}] {x.rule.match!r:<{width}}  {str(x.rule.op) + src:<32} {x.keys:>5} keys"
            f"  read {human_bytes(x.bytes_read):>9}  write {human_bytes(x.bytes_written):>9}"
        )
    if plan.dropped:
        lines.append(f"dropped ({len(plan.dropped)} keys):")
        by_reason: dict[str, list[str]] = defaultdict(list)
        for d in plan.dropped:
            by_reason[d.reason].append(d.key)
        for reason, keys in by_reason.items():
            lines.append(f"  {reason}: {some_keys(keys)}")
    copies = sum(s.copies_bytes for s in plan.steps)
    lines.append(
        f"total: {len(plan.steps)} tensors in {len(plan.shards)} shard(s), {r.dtype}; "
        f"read {human_bytes(plan.bytes_read)}, write {human_bytes(plan.bytes_written)}"
        + (f"; {copies} tensors copied byte for byte" if copies else "")
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(printable(line) for line in lines)


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
