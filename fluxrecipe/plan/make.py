"""Rules x keys -> a Plan (make_plan), with every check that needs the sources' headers: which rule decides
each key, its inputs, the families, the schedules, the output's files and config, the notes. Some 440
lines: make_plan and the checks it runs in order, each a function of a few lines, read top to bottom (a
split would separate a check from the one step of make_plan that calls it)."""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any

import regex

from .. import schedule
from ..architecture import config_fields, expected_parameters, mismatch
from ..errors import PlanError
from ..families import Family
from ..formats import FORMATS, bfl, gguf_model
from ..formats.gguf import BLOCK_TYPES
from ..formats.layout import OutFile, TensorRef
from ..loras import Factor, LoraFile, LoraSummary, lora_notes, lora_output, plan_patches
from ..ops import OPS, identity_of
from ..recipe import DTYPES, MATCH_SECONDS, MIXED, Recipe, Rule
from ..sources import Checkpoint
from ..text import cut, some_keys
from .data import Dropped, Plan, PlannedRecipe, SourceSummary, Step

MAX_HINT = 200  # characters: a suggested rule longer than this would be no help (it would list the keys)


def make_plan(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], shard_size: int, output_format: str = "diffusers", file_name: str = "model.safetensors",
    loras: dict[str, LoraFile] | None = None, lora_rank: int = 16, gguf_type: str | None = None, lora_energy: float | None = None,
) -> Plan:
    """Decide every output key and lay out the output's files; raises PlanError when recipe and sources do
    not fit together, or the output could not be loaded as what it claims to be. `loras`: the recipe's
    LoRAs, opened; `lora_rank`: the rank of a LoRA output (format=lora, lora_peft); `gguf_type`: the whole
    file's type of format=gguf (default Q8_0)."""
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
    whole_file = gguf_model.file_type(gguf_type) if output_format == "gguf" else None
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
        if whole_file is not None:  # a ggml type per tensor: the rule's, or the file's
            wanted = gguf_model.rule_type(rule.dtype, rule.where) if rule.dtype else whole_file
            dtype, scaled = gguf_model.wanted_type(key, shape, wanted, rule.dtype is not None, family).name, False
        else:
            dtype, scaled = DTYPES[MIXED[name] if name in MIXED and family.high_precision(key, shape) else name]
        if dtype in BLOCK_TYPES and whole_file is None:
            raise PlanError(f"{rule.where if rule.dtype else f'recipe {recipe.name!r}'}: dtype {name} is a GGUF type, which only format=gguf writes")
        if scaled and not single:
            raise PlanError(f"{rule.where}: fp8_scaled is written only in the single-file formats (format=bfl or format=comfyui); diffusers cannot load it: use fp8")
        if scaled and not _scalable(key, shape):
            dtype, scaled = "BF16", False  # ComfyUI scales Linear weights; the rest stays in bf16, as its own exports do
        op, params = identity_of(recipe.base) if unshared else (rule.op.name, schedule.resolve(rule.params, key, blocks))
        steps.append(Step(key, rule.index, op, params, inputs, dtype, shape, scaled))
    notes += _mix_notes(recipe, checkpoints, foreign, steps, alone)
    if whole_file is not None:
        stored = gguf_model.stored_types({s.key: s.shape for s in steps}, {s.key: s.dtype for s in steps}, family)
        steps = [replace(s, dtype=stored[s.key]) for s in steps]
    if whole_file is not None and "dtype" in recipe.written:
        notes.append(f"format=gguf: the recipe's dtype {recipe.dtype} is not used; tensors whose rule names no dtype are {whole_file.name} (gguf_type=), or kept in high precision")
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
        gguf_type=whole_file.name if whole_file is not None else None,
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
