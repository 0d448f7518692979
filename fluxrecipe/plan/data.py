"""The plan's plain data: a Step per canonical output tensor, what was dropped, the sources and the recipe as
the plan keeps them, and the Plan itself (what make.py builds, text.py prints and the executor runs)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..families import Family
from ..formats import FORMATS
from ..formats.layout import OutFile, TensorRef, stored_bytes
from ..loras import Factor, LoraSummary, Patch
from ..ops import OPS, OpCall
from ..recipe import Recipe, describe_rule


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
        return stored_bytes(self.dtype, self.numel)

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
    gguf_type: str | None = None  # format=gguf: the whole file's ggml type (gguf_type=)
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
