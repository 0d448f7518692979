"""Rules x keys -> a Plan: one step per output tensor. Every check runs here, before any tensor byte is read.

The plan is plain data, in canonical keys (diffusers' names) whatever the sources' and the output's layouts:
which rule decided each key, which source tensors feed it (byte pieces, dtype, shape), the op and its
parameters for that key, the dtype it is rounded to; what is dropped and why; the output's files, each
tensor of which is a list of element ranges of steps (a rename, or BFL's fused and swapped tensors); and the
config the output carries. It can be printed (`dry_run=true`) and tested without touching a tensor, and
the executor needs nothing else.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from typing import Any

import regex

from . import schedule
from .architecture import config_fields, expected_parameters, mismatch
from .errors import PlanError
from .families import Family
from .formats import FORMATS, bfl
from .formats.layout import OutFile, TensorRef
from .formats.safetensors import ITEMSIZE
from .loras import Factor, LoraFile, LoraSummary, Patch, lora_notes, lora_output, plan_patches
from .ops import OPS, OpCall, identity_of
from .recipe import DTYPES, MATCH_SECONDS, MIXED, Recipe, Rule, describe_rule
from .sources import Checkpoint
from .text import cut, printable, some_keys

SHOWN = 6  # how many keys a message lists before it says "and N more"
MAX_HINT = 200  # characters: a suggested rule longer than this would be no help (it would list the keys)


@dataclass(frozen=True)
class Step:
    """One canonical output tensor: the rule that decided it, its op and parameters (plain numbers: a
    per-block schedule resolved for this key), its inputs in order, the dtype it is rounded to (scaled: fp8
    with a per-tensor scale) and its shape."""

    key: str
    rule: int
    op: str
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[TensorRef, ...]
    dtype: str
    shape: tuple[int, ...]
    scaled: bool = False
    patches: tuple[Patch, ...] = ()  # the LoRAs baked into this tensor, in order (loras.py)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def copies_bytes(self) -> bool:
        """An identity op (`take`) into the same dtype, unscaled either side: the bytes are copied as they are, never decoded."""
        src = self.inputs[0] if self.inputs else None
        return OPS[self.op].identity and src.dtype == self.dtype and src.scale is None and not self.scaled and not self.patches

    @property
    def bytes_read(self) -> int:
        return sum(t.nbytes for t in self.inputs) + sum(p.nbytes for p in self.patches)


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
    layout: str = "diffusers"
    ignored: tuple[tuple[str, int], ...] = ()  # what its files hold besides the transformer: group, keys
    location: str = ""  # what was read: the folder, or the single file
    downloaded: bool = True  # False: planned from headers read on the hub, its weights not downloaded (a dry run)
    model: str = ""  # its family and variant: 'FLUX.1 schnell', 'FLUX.2 klein 4B'


@dataclass(frozen=True)
class PlannedRule:
    """A recipe rule as the plan keeps it: what the printed plan, the card and provenance say of it."""

    index: int
    match: str
    op: OpCall  # as written
    sources: tuple[str, ...]
    dtype: str | None
    params: dict[str, Any]  # checked, defaults filled in (schedules as schedule.Schedule)

    def describe(self) -> str:
        return describe_rule(self.index, self.match, self.op)


@dataclass(frozen=True)
class PlannedRecipe:
    """What the plan keeps of its recipe: plain data, for the printed plan, packaging and provenance."""

    name: str
    file: str | None
    description: str
    base: str
    dtype: str  # the output dtype by name, for keys whose rule names none
    params: dict[str, Any]  # named parameters (alpha, ...)
    rules: tuple[PlannedRule, ...]
    written: dict[str, Any]  # the recipe as composed, interpolations kept (a pinned recipe is built from it)
    content_hashes: dict[str, str]  # source -> the content hash the recipe pins (a replay must read the same bytes)

    @classmethod
    def of(cls, recipe: Recipe) -> PlannedRecipe:
        rules = tuple(PlannedRule(r.index, r.match, r.op, r.sources, r.dtype, r.params) for r in recipe.rules)
        hashes = {name: spec.content_hash for name, spec in recipe.sources.items() if spec.content_hash}
        return cls(recipe.name, recipe.file, recipe.description, recipe.base, recipe.dtype, recipe.params, rules, recipe.written, hashes)


@dataclass(frozen=True)
class RuleStats:
    rule: PlannedRule
    keys: int
    bytes_read: int
    bytes_written: int


@dataclass(frozen=True)
class Plan:
    recipe: PlannedRecipe
    format: str  # "diffusers" (a folder); "bfl", "comfyui", "lora" or "lora_peft" (one file)
    sources: tuple[SourceSummary, ...]
    steps: tuple[Step, ...]
    files: tuple[OutFile, ...]
    dropped: tuple[Dropped, ...]
    config: dict[str, Any]
    notes: tuple[str, ...]
    loras: tuple[LoraSummary, ...] = ()  # the LoRAs baked in
    factors: tuple[Factor, ...] = ()  # format=lora / lora_peft: the matrices of the LoRA file, in order
    lora_rank: int | None = None  # format=lora / lora_peft: the rank asked for
    lora_energy: float | None = None  # a LoRA output: each matrix's rank the smallest keeping this fraction of its squared norm, at most lora_rank
    family: Family | None = None  # the output's (the base's) model family
    lora_space: Any = None  # lora_space.LoraSpace: a recipe with loras and no sources, written as a LoRA (no steps)

    @property
    def single_file(self) -> bool:
        return FORMATS[self.format].single_file

    @property
    def bytes_read(self) -> int:
        held = sum(c.down.nbytes + sum(r.up.nbytes for r in c.rows) for m in self.lora_space.modules for c in m.contributions) if self.lora_space else 0
        return sum(s.bytes_read for s in self.steps) + sum(b.nbytes for f in self.factors for b, c in zip(f.bases, f.changed) if c) + held

    @property
    def bytes_written(self) -> int:
        return sum(f.nbytes for f in self.files)

    def step(self, key: str) -> Step:
        return self._by_key()[key]

    def _by_key(self) -> dict[str, Step]:
        cached = self.__dict__.get("_steps_by_key")
        if cached is None:
            cached = {s.key: s for s in self.steps}
            object.__setattr__(self, "_steps_by_key", cached)
        return cached

    def rule_stats(self) -> list[RuleStats]:
        keys, read, written = Counter(), Counter(), Counter()
        for s in self.steps:
            keys[s.rule] += 1
            read[s.rule] += s.bytes_read
            written[s.rule] += 0 if self.factors else s.nbytes  # a LoRA output writes factors, not steps
        keys.update(d.rule for d in self.dropped if d.rule is not None)
        return [RuleStats(r, keys[r.index], read[r.index], written[r.index]) for r in self.recipe.rules]


def make_plan(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], shard_size: int, output_format: str = "diffusers", file_name: str = "model.safetensors",
    loras: dict[str, LoraFile] | None = None, lora_rank: int = 16, lora_energy: float | None = None,
) -> Plan:
    """Decide every output key and lay out the output's files; raises PlanError when recipe and sources do
    not fit together, or the output could not be loaded as what it claims to be. `loras`: the recipe's
    LoRAs, opened; `lora_rank`: the rank of a LoRA output (format=lora, lora_peft)."""
    base = checkpoints[recipe.base]
    family = base.family
    foreign = _check_families(recipe, checkpoints)
    if base.config is None:
        raise PlanError(
            f"base '{recipe.base}' ({base.folder}) has no config.json: the output needs one, so the base must be a diffusers "
            "folder or repo with its config.json, or a single .safetensors file (whose config is derived from its shapes)"
        )
    config = _output_config(recipe, base)

    decided: dict[str, Rule] = {}
    for key in base.tensors:
        rule = next((r for r in recipe.rules if r.matches(key)), None)
        if rule is None:
            raise PlanError(
                f"key '{cut(key)}' of base '{recipe.base}' matches no rule of recipe '{recipe.name}': "
                "every key needs one; end the rules with a catch-all {match: '.*', op: ...}"
            )
        decided[key] = rule
    _check_every_rule_used(recipe, checkpoints, decided)
    blocks = schedule.Blocks.of(base.tensors, family)
    _check_schedules(recipe, decided, blocks)

    single = FORMATS[output_format].single_file
    steps, dropped, notes = [], [], []
    alone: Counter[str] = Counter()  # foreign source -> keys its rules take from the base alone
    for key, rule in decided.items():
        if not rule.op.spec.writes:
            dropped.append(Dropped(key, f"dropped by {rule.describe()}", rule.index))
            continue
        unshared = [n for n in rule.sources if n in foreign and not _shares(checkpoints[n], base, key)]
        alone.update(unshared)  # mix_families: a tensor another family lacks comes from the base alone
        inputs = (base.tensors[key],) if unshared else _inputs(rule, key, checkpoints, recipe.base, decided)
        shape = base.tensors[key].shape
        name = rule.dtype or recipe.dtype
        dtype, scaled = DTYPES[MIXED[name] if name in MIXED and family.high_precision(key, shape) else name]
        if scaled and not single:
            raise PlanError(f"{rule.where}: fp8_scaled is written only in the single-file formats (format=bfl or format=comfyui); diffusers cannot load it: use fp8")
        if scaled and not _scalable(key, shape):
            dtype, scaled = "BF16", False  # ComfyUI scales Linear weights; the rest stays in bf16, as its own exports do
        op, params = identity_of(recipe.base) if unshared else (rule.op.name, schedule.resolve(rule.params, key, blocks))
        steps.append(Step(key, rule.index, op, params, inputs, dtype, shape, scaled))
    notes += _mix_notes(recipe, checkpoints, foreign, steps, alone)
    dropped += _not_in_base(recipe, checkpoints)
    _check_fits_config(recipe, config, steps, family)
    summaries: list[LoraSummary] = []
    if loras:
        patches, summaries = plan_patches(loras, {s.key: s.shape for s in steps}, family)
        steps = [replace(s, patches=patches[s.key]) if s.key in patches else s for s in steps]
        notes += lora_notes(summaries)
    factors: tuple[Factor, ...] = ()
    if FORMATS[output_format].lora_scheme:
        file, factors, factor_notes = _lora_file(recipe, steps, checkpoints, output_format, lora_rank, file_name, family)
        files = (file,)
        by_key = {s.key: s for s in steps}
        ordered = [by_key[k] for k in dict.fromkeys(p.key for f in factors for p, changed in zip(f.parts, f.changed) if changed)]
        notes += factor_notes
    else:
        files = _out_files(steps, output_format, shard_size, file_name, family)
        ordered = [s for f in files for s in _steps_of(f, steps)]

    return Plan(
        recipe=PlannedRecipe.of(recipe),
        format=output_format,
        sources=tuple(_summary(recipe, c) for c in checkpoints.values()),
        steps=tuple(ordered),
        files=files,
        dropped=tuple(dropped),
        config=config,
        notes=tuple(notes + _notes(recipe, steps, checkpoints, output_format)),
        loras=tuple(summaries),
        factors=factors,
        lora_rank=lora_rank if factors else None,
        lora_energy=lora_energy if factors else None,
        family=family,
    )


def _check_families(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> set[str]:
    """Every source of the base's family and width, or refused in one line naming both (before any byte is
    read); with `mix_families: true`, the sources that are not (they give only the tensors they share with
    the base, same name and shape) are returned."""
    base = checkpoints[recipe.base]
    foreign = set()
    for name, c in checkpoints.items():
        if c.family is base.family and c.family.width(c.shapes) == base.family.width(base.shapes):
            continue
        if not recipe.mix_families:
            first, second = sorted((recipe.base, name), key=list(recipe.sources).index)
            pair = f"sources '{first}' ({checkpoints[first].describe()}) and '{second}' ({checkpoints[second].describe()})"
            fix = f"set `mix_families: true` in the recipe to take from '{name}' only the tensors it shares with base '{recipe.base}' (same name and shape)"
            if c.family is not base.family:
                raise PlanError(f"{pair} are different model families: fluxrecipe merges models of one family ({fix})")
            raise PlanError(
                f"{pair} are variants of {c.family.name} whose shapes differ (width {c.family.width(checkpoints[first].shapes)} and "
                f"{c.family.width(checkpoints[second].shapes)}): fluxrecipe merges models of one shape ({fix})"
            )
        foreign.add(name)
    if recipe.mix_families and not foreign:
        raise PlanError(f"recipe '{recipe.name}': mix_families: true changes nothing: every source is {base.family.name} of base '{recipe.base}''s width; remove it")
    return foreign


def _shares(source: Checkpoint, base: Checkpoint, key: str) -> bool:
    """Whether a source of another family (mix_families) has the base's tensor: the same name and shape."""
    tensor = source.tensors.get(key)
    return tensor is not None and tensor.shape == base.tensors[key].shape


def _mix_notes(recipe: Recipe, checkpoints: dict[str, Checkpoint], foreign: set[str], steps: list[Step], alone: Counter) -> list[str]:
    """mix_families: per foreign source, how many tensors came from it and how many from the base alone."""
    notes = []
    for name in (n for n in recipe.sources if n in foreign):
        used = sum(any(t.source == name for t in s.inputs) for s in steps)
        notes.append(
            f"mix_families: '{name}' ({checkpoints[name].describe()}) shares {sum(_shares(checkpoints[name], checkpoints[recipe.base], k) for k in checkpoints[recipe.base].tensors)} "
            f"tensors (name and shape) with base '{recipe.base}' ({checkpoints[recipe.base].describe()}): {used} merged from it; "
            f"{alone[name]} its rules would take from it come from the base alone"
        )
    return notes


def _lora_file(recipe: Recipe, steps: list[Step], checkpoints: dict[str, Checkpoint], output_format: str, rank: int, file_name: str, family: Family):
    """format=lora / lora_peft: the difference of the result to the base, as a LoRA file (loras.lora_output)."""
    if len(recipe.sources) > 1 and "base" not in recipe.resolved:
        raise PlanError(
            f"recipe '{recipe.name}': format={output_format} writes the difference between the recipe's result and its base: "
            f"name the base with `base: SOURCE` (one of {', '.join(recipe.sources)})"
        )
    base = recipe.base
    changed = {s.key: not (OPS[s.op].identity and s.inputs[0].source == base and not s.patches) for s in steps}
    file, factors = lora_output(
        output_format, {s.key: s.shape for s in steps}, changed, checkpoints[base].tensors, rank,
        DTYPES[recipe.dtype][0], file_name, f"recipe '{recipe.name}' (format={output_format})", family,
    )
    notes = ["a matrix whose difference to the base turns out to be exactly 0 is left out of the file (the run counts them, as does the provenance's lora.left_out)"]
    clamped = [f.module for f in factors if 0 < f.rank < rank]
    if clamped:
        notes.append(f"lora_rank={rank}: {len(clamped)} matrices are smaller and are written at their full rank, exactly ({some_keys(clamped)})")
    flat = [f.module for f in factors if not f.rank]
    if flat:
        notes.append(f"a LoRA holds weight matrices only: {len(flat)} 1-D tensors (biases, norms) that the recipe may change are not written; the run says how much each differs ({some_keys(flat)})")
    return file, factors, notes


def _scalable(key: str, shape: tuple[int, ...]) -> bool:
    """A Linear layer's weight: what ComfyUI's scaled fp8 quantizes."""
    return key.endswith(".weight") and len(shape) == 2


def _out_files(steps: list[Step], output_format: str, shard_size: int, file_name: str, family: Family) -> tuple[OutFile, ...]:
    shapes = {s.key: s.shape for s in steps}
    dtypes = {s.key: s.dtype for s in steps}
    return FORMATS[output_format].write(shapes, dtypes, {s.key for s in steps if s.scaled}, shard_size, file_name, family)


def _steps_of(file: OutFile, steps: list[Step]) -> list[Step]:
    """The steps in the order the file's tensors need them (each once): the order the executor runs them."""
    by_key = {s.key: s for s in steps}
    order = dict.fromkeys(p.key for t in file.tensors for p in t.parts)
    return [by_key[k] for k in order]


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
            bfl_names = _in_bfl_names(rule, checkpoints[recipe.base])
            if bfl_names:
                raise PlanError(f"{rule.where} (match {rule.match!r}) decides no key: {why}; {bfl_names}")
        raise PlanError(f"{rule.where} (match {rule.match!r}) decides no key: {why}. A typo? If intended, mark the rule `optional: true`")


def _in_bfl_names(rule: Rule, base: Checkpoint) -> str:
    """What to tell a rule that matches no canonical key but matches the base's tensors under Black Forest Labs'
    or ComfyUI's names: that rules match diffusers' names, the tensors it meant, and the rule in those names
    (its regex with each BFL name written as diffusers', from bfl's table, if that means the same tensors;
    else a regex of those tensors). "" when it matches no BFL name either."""
    family = base.family
    shapes = {k: t.shape for k, t in base.tensors.items()}
    try:
        tensors = bfl.out_tensors(shapes, dict.fromkeys(shapes, "F32"), "", family.bfl)
    except PlanError:
        return ""  # the base has tensors BFL's layout has no place for: no BFL names to compare with
    hits = {}  # the BFL tensors the rule matches, in the first spelling it matches (BFL's, then ComfyUI's) -> their canonical keys
    for t in tensors:
        spelling = next((prefix + t.name for prefix in ("", *family.comfyui_prefixes) if rule.matches(prefix + t.name)), None)
        if spelling:
            hits[spelling] = {p.key for p in t.parts}
    if not hits:
        return ""
    meant = set().union(*hits.values())
    canonical = [k for k in base.tensors if k in meant]
    others = [k for k in base.tensors if k not in meant]
    names = sorted(bfl.spellings(family.bfl, family.comfyui_prefixes), key=lambda spelling: -len(spelling[0]))
    translations = [_diffusers_spelling(rule.match, names, qualified) for qualified in (False, True)]
    suggestion = next((t for t in translations if t is not None and _matches_exactly(t, canonical, others)), None) or _hint_pattern(canonical, others)
    text = (
        "rules match diffusers' names (the canonical keys), not Black Forest Labs' or ComfyUI's: it matches "
        f"{len(hits)} tensors in those names ({some_keys(list(hits), 3)}), which are {some_keys(canonical, 3)} in diffusers' names"
    )
    if len(suggestion) > MAX_HINT:
        return text + "; write the rule in those names"
    return text + f"; in diffusers' names the rule reads {{match: '{suggestion}', op: '{rule.op}'}}"


def _diffusers_spelling(pattern: str, names: list[tuple[str, tuple[str, ...], str]], qualified: bool) -> str | None:
    """`pattern` with every BFL/ComfyUI name in it (a prefix, group or module, its dots written as `.` or `\\.`)
    replaced by diffusers' (`names`: bfl.spellings, longest first; an alternation for a fused module's parts;
    `qualified`: a block's module behind its group and any block number, for a pattern that names no group);
    None if it holds none."""
    dot = r"(?:\\\.|\.)"
    found = re.compile("|".join(
        r"((?<!\w)" + dot.join(re.escape(part) for part in name.split(".")) + (r"(?!\w))" if name[-1].isalnum() else ")") for name, _, _ in names
    ))

    def diffusers(m: re.Match) -> str:
        _, targets, group = names[m.lastindex - 1]
        escaped = [t.replace(".", "\\.") for t in targets]
        text = escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"
        if group:  # a block's module: behind its block's number in the pattern, or (qualified) behind any block's
            return f"^{group}\\.\\d+\\.{text}" if qualified else text
        return "^" + text if text else text  # a group or top-level module starts a canonical key (`proj_out` alone is also a block's)

    translated = found.sub(diffusers, pattern)
    return re.sub(r"\^{2,}", "^", translated) if translated != pattern else None


def _matches_exactly(pattern: str, keys: list[str], others: list[str]) -> bool:
    """Whether `pattern` matches every one of `keys` and none of `others` (within the recipe regexes' time bound)."""
    try:
        rx = regex.compile(pattern)
        return all(rx.search(k, timeout=MATCH_SECONDS) for k in keys) and not any(rx.search(k, timeout=MATCH_SECONDS) for k in others)
    except (regex.error, TimeoutError, RecursionError, OverflowError):
        return False


def _check_schedules(recipe: Recipe, decided: dict[str, Rule], blocks: schedule.Blocks) -> None:
    """Every per-block schedule against the model: the blocks it names exist, and it gives every key of its
    rule a value."""
    for rule in recipe.rules:
        keys = [k for k, r in decided.items() if r is rule]
        for name, value in rule.params.items():
            for one in schedule.schedules_in(value):
                try:
                    schedule.check_against(one, keys, blocks)
                except ValueError as e:
                    raise PlanError(f"{rule.param_where[name]}: {rule.op.name} parameter '{name}' {e}") from None


def _inputs(rule: Rule, key: str, checkpoints: dict[str, Checkpoint], base: str, decided: dict[str, Rule]) -> tuple[TensorRef, ...]:
    shape = checkpoints[base].tensors[key].shape
    inputs = []
    for name in rule.sources:
        loc = checkpoints[name].tensors.get(key)
        if loc is None:
            raise PlanError(_missing_input(rule, name, checkpoints, base, decided))
        if loc.shape != shape:
            hint = ""
            family, a, b = checkpoints[base].family, checkpoints[base].describe(), checkpoints[name].describe()
            if family.block_of(key) in (family.block_of(family.hidden_key), *family.final_blocks) and a != b:  # in or out channels
                hint = (
                    f": a FLUX variant mismatch (base '{base}' is {a}, '{name}' is {b}); "
                    f"give '{key.rsplit('.', 1)[0]}' a rule of its own before this one, e.g. {{match: '^{re.escape(key.rsplit('.', 1)[0])}\\.', op: 'take:{base}'}}"
                )
            raise PlanError(f"{rule.where} ({rule.op}): '{cut(key)}' is {list(shape)} in base '{base}' but {list(loc.shape)} in '{name}' ({loc.file}){hint}")
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
            f"of base '{base}' (e.g. '{cut(next(iter(source.tensors)))}'): it is not a model of the base's kind (a LoRA, or another architecture?); "
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


def _check_fits_config(recipe: Recipe, config: dict[str, Any], steps: list[Step], family: Family) -> None:
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
        problems.append(f"{len(wrong)} key(s) have other shapes than the config implies ('{cut(k)}' is {list(have[k])}, the config says {list(expected[k])})")
    hint = family.config_hint(missing, unexpected, config)
    raise PlanError(f"recipe '{recipe.name}': the output would not load as {config.get('_class_name')}: " + "; ".join(problems) + "." + hint)


def _summary(recipe: Recipe, c: Checkpoint) -> SourceSummary:
    dtypes = tuple(sorted({t.dtype for t in c.tensors.values()}))
    return SourceSummary(
        c.name, recipe.sources[c.name].describe(), c.origin, c.folder, len(c.tensors), c.nbytes, dtypes, c.layout, tuple(c.ignored.items()),
        c.location or c.folder, c.downloaded, c.describe(),
    )


def _notes(recipe: Recipe, steps: list[Step], checkpoints: dict[str, Checkpoint], output_format: str) -> list[str]:
    notes = []
    for rule in recipe.rules:
        alpha = rule.params.get("alpha") if rule.op.name == "lerp" else None
        outside = [a for a in (alpha.numbers() if isinstance(alpha, schedule.Schedule) else [alpha]) if a is not None and not 0.0 <= a <= 1.0]
        if outside:
            notes.append(f"{rule.describe()} extrapolates: alpha = {outside[0]} lies outside [0, 1]")
    for c in checkpoints.values():
        if c.config_derived:
            notes.append(f"source '{c.name}' ({c.describe()}) is a single file in {c.layout} layout with no config.json: its config is derived from its shapes ({c.family.summary(c.config)})")
        notes += [f"source '{c.name}': {n}" for n in c.notes]
        if c.ignored:
            notes.append(f"source '{c.name}': only the transformer is read; ignored " + ", ".join(f"{n} keys under {g}" for g, n in c.ignored.items()))
        if c.scaled:
            notes.append(f"source '{c.name}': {c.scaled} tensors are scaled fp8, read as fp8 value x scale")
    kept = [s.key for s in steps if s.dtype == "BF16" and _rule_dtype(recipe, s.rule) in MIXED]
    if kept:
        notes.append(f"fp8_mixed: {len(kept)} tensors the {checkpoints[recipe.base].family.name} family keeps in high precision are written in bf16 ({some_keys(kept)})")
    unscaled = [s.key for s in steps if s.dtype == "BF16" and DTYPES[_rule_dtype(recipe, s.rule)][1]]
    if unscaled:
        notes.append(f"fp8_scaled applies to Linear weights (2-D '.weight' tensors); {len(unscaled)} other tensors of those rules are written in bf16 ({some_keys(unscaled)})")
    if FORMATS[output_format].scaled_note and any(s.scaled for s in steps):
        notes.append(FORMATS[output_format].scaled_note)
    ranges = {"F8_E4M3": "fp8 (+-448)", "F8_E5M2": "fp8_e5m2 (+-57344)"}
    narrow = sorted({ranges[s.dtype] for s in steps if s.dtype in ranges and not s.scaled})
    if narrow:
        notes.append(f"values beyond {' and '.join(narrow)} are clamped to the dtype's range and counted (provenance, a warning)")
    read = sorted({(t.source, t.dtype) for s in steps for t in s.inputs})
    written = sorted({s.dtype for s in steps})
    if {d for _, d in read} != set(written):
        held = ", ".join(f"{src} {d}" for src, d in read)
        notes.append(f"inputs hold {held}; all arithmetic is float32, rounded once to {'/'.join(written)}")
    return notes


def _rule_dtype(recipe: Recipe, index: int) -> str:
    return recipe.rules[index].dtype or recipe.dtype


def format_plan(plan: Plan) -> str:
    """The plan as a person reads it: sources, per-rule counts and bytes, drops, totals, notes."""
    r = plan.recipe
    lines = [f"recipe {r.name}" + (f" ({r.file})" if r.file else "")]
    if r.description:
        lines.append(f"  {r.description}")
    if r.params:
        lines.append("  parameters: " + ", ".join(f"{k}={_brief(v)}" for k, v in r.params.items()))
    lines += ["sources:"] if plan.sources else []
    for s in plan.sources:
        where = ", ".join(f"{k} {v}" for k, v in s.origin.items())
        mark = "  (base)" if s.name == r.base else ""
        lines.append(f"  {s.name:<12} {s.spec}{mark}")
        lines.append(f"  {'':<12} {s.model}: {s.tensors} tensors ({s.layout} layout), {human_bytes(s.nbytes)}, {'/'.join(s.dtypes)}; {where}")
        lines.append(f"  {'':<12} {s.folder}" + ("" if s.downloaded else "  (headers read on the hub; weights not downloaded)"))
    where = f"one {plan.format} file, {plan.files[0].name}" if plan.single_file else f"a {plan.format} folder"
    if plan.lora_space:
        from .lora_space import describe

        lines.append(f"output: {where}: a LoRA made of LoRAs, no model: {describe(plan.lora_space)}")
    elif plan.factors:
        matrices = [f for f in plan.factors if f.rank]
        exact = sum(f.exact for f in matrices)
        lines.append(
            f"output: {where}: a LoRA of rank {plan.lora_rank}, the difference between the recipe's result and base '{r.base}'; "
            f"{len(matrices)} matrices factored ({exact} by exact SVD, {len(matrices) - exact} by randomized SVD), the relative error of each reported after the run"
            + (f"; each matrix's rank the smallest keeping {plan.lora_energy:g} of its squared norm, at most {plan.lora_rank}" if plan.lora_energy is not None else "")
        )
    else:
        flag = "".join(f", {f}: {json.dumps(plan.config[f])}" for f in plan.family.flags if f in plan.config)
        lines.append(f"output: {where}; {r.base}'s architecture ({plan.config.get('_class_name')}{flag})")
    lines += ["rules:"] if plan.recipe.rules else []
    width = max((len(repr(x.rule.match)) for x in plan.rule_stats()), default=0)
    for x in plan.rule_stats():
        src = f" over {', '.join(x.rule.sources)}" if x.rule.op.spec.over_rule_sources else ""
        dtype = f" -> {x.rule.dtype}" if x.rule.dtype else ""
        lines.append(
            f"  [{x.rule.index}] {x.rule.match!r:<{width}}  {_op_text(x.rule) + src + dtype:<32} {x.keys:>5} keys"
            f"  read {human_bytes(x.bytes_read):>9}  write {human_bytes(x.bytes_written):>9}"
        )
        lines += _block_values(plan, x.rule)
    if plan.loras:
        lines.append("loras (combined as LoRAs):" if plan.lora_space else "loras (added to the rules' result in float32, before the one rounding):")
        for lora in plan.loras:
            lines.append(f"  {lora.name:<12} {lora.spec}")
            lines.append(f"  {'':<12} {lora.describe()}")
    if plan.dropped:
        lines.append(f"dropped ({len(plan.dropped)} keys):")
        by_reason: dict[str, list[str]] = defaultdict(list)
        for d in plan.dropped:
            by_reason[d.reason].append(d.key)
        for reason, keys in by_reason.items():
            lines.append(f"  {reason}: {some_keys(keys)}")
    copies = 0 if plan.factors else sum(s.copies_bytes for s in plan.steps)
    dtypes = "/".join(sorted({s.dtype + (" scaled" if s.scaled else "") for s in plan.steps} | ({plan.lora_space.dtype} if plan.lora_space else set())))
    tensors = sum(len(f.entries()) for f in plan.files)
    lines.append(
        f"total: {tensors} tensors in {len(plan.files)} file(s), {dtypes}; "
        f"read {human_bytes(plan.bytes_read)}, write {human_bytes(plan.bytes_written)}"
        + (f"; {copies} tensors copied byte for byte" if copies else "")
    )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(printable(line) for line in lines)


def _brief(value: Any) -> str:
    """A recipe parameter for the plan's header: a long schedule is printed block by block under its rules."""
    if not isinstance(value, (list, dict)):
        return str(value)
    text = str(schedule.parse(value))
    return text if len(text) <= 80 else "per block (values under the rules)"


def _op_text(rule: PlannedRule) -> str:
    """The op as the rules table shows it: a schedule (printed block by block below) as `per block`."""
    scheduled = {n for n, v in rule.params.items() if schedule.schedules_in(v)}
    if not scheduled:
        return str(rule.op)
    shown = ", ".join(f"{n}: per block" if n in scheduled else f"{n}: {v}" for n, v in rule.op.params)
    return f"{rule.op.name}{{{shown}}}"


def _block_values(plan: Plan, rule: PlannedRule) -> list[str]:
    """The value each block gets from the rule's scheduled parameters, in model order; a run of blocks with
    the same value on one line."""
    lines = []
    for name in (n for n, v in rule.params.items() if schedule.schedules_in(v)):
        per_block = {}
        for step in plan.steps:
            if step.rule == rule.index:
                per_block.setdefault(plan.family.block_of(step.key) or step.key, step.values[name])
        runs: list[list] = []  # [first block, last block, value]
        for block in sorted(per_block, key=plan.family.block_order):
            if runs and runs[-1][2] == per_block[block]:
                runs[-1][1] = block
            else:
                runs.append([block, block, per_block[block]])
        lines.append(f"      {name} by block:")
        width = max(len(_run_name(a, b)) for a, b, _ in runs)
        lines += [f"        {_run_name(a, b):<{width}}  {_number_text(v)}" for a, b, v in runs]
    return lines


def _run_name(first: str, last: str) -> str:
    return first if first == last else f"{first} .. {last}"


def _number_text(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_number_text(v) for v in value) + "]"
    return schedule.number_text(value)


def human_bytes(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
