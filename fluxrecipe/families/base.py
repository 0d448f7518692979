"""The Family protocol: everything fluxrecipe asks about one kind of model, answered in one module per family.

The planner, the executor and the formats work in canonical keys (the parameter names of the family's
diffusers model class) and never name a tensor or a block of a model themselves: they ask its Family. A
family module (flux1.py, flux2.py, ...) builds one `Family` out of plain data and a few functions:
- `name`, `class_name`: 'FLUX.2', its diffusers model class ('Flux2Transformer2DModel');
- `fingerprints`: regexes one of its files' keys matches (in any layout, ComfyUI's prefix removed), tried in
  the registry's order, so that a family whose files also hold another's fingerprint comes first;
- `bfl`: its Black Forest Labs layout as one table (renames, rows of fused tensors, a swap of row halves,
  norms; numbered modules outside the block groups, `layers.*.in_layer`), which serves reading and writing;
  the block vocabulary (names, groups, model order) and the keys that tell the two layouts apart are derived
  from it, so each fact has one home;
- `derive_config` and `variant`: the diffusers config and the variant's name from the tensors' shapes
  (ShapeError, one line, for shapes the family cannot have); `summary`: a config's telling values;
- `preview`: the diffusers pipeline, its default repo and sampling defaults for a model of this family (or
  that diffusers offers only a modular pipeline, which previews cannot drive);
- `licences`: its models' licences, for a merge's model card;
- optional: `lora` (LoRA key schemes of its trainers beyond the generic ones: kohya, ComfyUI, diffusers /
  PEFT and OneTrainer come from the table and the canonical keys), `config_hint` (advice when an output's
  keys do not fit its config), `kept_in_bf16` (what an fp8 export keeps in bf16, the dtype `fp8_mixed`,
  where `high_precision`'s rule does not fit), `comfyui_prefixes`, `max_blocks` / `max_size` (bounds of a
  config), `refused` (models of the family fluxrecipe knows and does not merge, told by a key, refused by
  name: Chroma1-Radiance), `skipped` (keys its files may hold that are no part of the model: FLUX.3's
  training-only heads), `flags` (the config's yes/no fields that tell its variants apart, for the plan).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..text import cut

Shapes = dict[str, tuple[int, ...]]

# --- the Black Forest Labs layout as a table: BFL module -> the canonical modules whose rows it holds --------


@dataclass(frozen=True)
class Rename:
    target: str


@dataclass(frozen=True)
class Fused:
    """Rows of several canonical tensors, in order: each has `hidden` rows but the last, which has the rest."""

    targets: tuple[str, ...]


@dataclass(frozen=True)
class Swapped:
    """The canonical tensor with its two row halves swapped (BFL: shift, scale; diffusers: scale, shift)."""

    target: str


@dataclass(frozen=True)
class Norm:
    """An RMSNorm: `.scale` in BFL, `.weight` in diffusers."""

    target: str


Mapping = Rename | Fused | Swapped | Norm
NUMBER = "*"  # in a module name of a table's `top` or `final`: a layer number (Chroma's `layers.*.in_layer`)


def targets(mapping: Mapping) -> tuple[str, ...]:
    return mapping.targets if isinstance(mapping, Fused) else (mapping.target,)


def numbered(mapping: Mapping, number: str) -> Mapping:
    """A numbered module's mapping with its number put into its targets."""
    if isinstance(mapping, Fused):
        return Fused(tuple(t.replace(NUMBER, number) for t in mapping.targets))
    return type(mapping)(mapping.target.replace(NUMBER, number))


def _number_pattern(name: str, separator: str = ".") -> re.Pattern:
    """A numbered module name (dots written as `separator`) as a regex whose group 1 is the number."""
    return re.compile(re.escape(name.replace(".", separator)).replace(re.escape(NUMBER), r"(\d+)"))


@dataclass(frozen=True, eq=False)
class Group:
    """Numbered blocks: BFL `{bfl}.N.X` holds canonical `{canonical}.N.Y` as `table` says (X -> mapping of Y).
    `beside`: the group runs beside the one before it (another stream at the same depth, as FLUX.3's per-mode
    blocks): a gradient over the model's blocks gives its block N the value of that group's block N."""

    bfl: str
    canonical: str
    table: dict[str, Mapping]
    beside: bool = False


@dataclass(frozen=True, eq=False)
class BflTable:
    """A family's whole BFL layout: the modules before the blocks (in model order), the block groups, the
    modules after them. `hidden`: the BFL key whose dim 0 is the model's width (it sizes Fused parts). A
    module name of `top` or `final` may hold a layer number, NUMBER, as its targets do: the layers of a
    module of its own (Chroma's guidance network), however many a model has."""

    top: dict[str, Mapping]
    groups: tuple[Group, ...]
    final: dict[str, Mapping]
    hidden: str

    @cached_property
    def key_pattern(self) -> re.Pattern:
        """A BFL block key: (group, index, module in the block, parameter)."""
        names = "|".join(re.escape(g.bfl) for g in self.groups)
        return re.compile(rf"^({names})\.(\d+)\.(.+)\.(weight|bias|scale)$")

    @cached_property
    def canonical_pattern(self) -> re.Pattern:
        """A canonical block key: (group, index)."""
        names = "|".join(re.escape(g.canonical) for g in self.groups)
        return re.compile(rf"^({names})\.(\d+)\.")

    def group(self, name: str) -> Group:
        """The group by its BFL or its canonical name."""
        return next(g for g in self.groups if name in (g.bfl, g.canonical))

    def canonical_modules(self, blocks: int) -> set[str]:
        """Every canonical module the layout names, in blocks 0 to `blocks` - 1 of each group (and as many
        layers of a numbered module): what a LoRA read without a model may name."""
        names = {f"{g.canonical}.{i}.{t}" for g in self.groups for i in range(blocks) for m in g.table.values() for t in targets(m)}
        for name, mapping in {**self.top, **self.final}.items():
            layers = [numbered(mapping, str(i)) for i in range(blocks)] if NUMBER in name else [mapping]
            names.update(t for m in layers for t in targets(m))
        return names

    @cached_property
    def _numbered(self) -> tuple[tuple[re.Pattern, str, Mapping], ...]:
        """The numbered modules outside the groups: (regex of the BFL name, the name, its mapping)."""
        return tuple((_number_pattern(name), name, m) for t in (self.top, self.final) for name, m in t.items() if NUMBER in name)

    def outer(self, module: str) -> Mapping | None:
        """The mapping of a BFL module outside the groups (a numbered one's with its number), or None."""
        found = self.top.get(module) or self.final.get(module)
        if found:
            return found
        return next((numbered(m, match[1]) for rx, _, m in self._numbered if (match := rx.fullmatch(module))), None)

    def outer_modules(self, table: dict[str, Mapping], keys: Iterable[str]) -> list[tuple[str, Mapping]]:
        """`table`'s modules (top or final) as BFL name -> mapping, a numbered one once per number the
        canonical `keys` hold, in order."""
        keys = list(keys)
        modules = []
        for name, mapping in table.items():
            if NUMBER not in name:
                modules.append((name, mapping))
                continue
            rx = _number_pattern(targets(mapping)[0] + ".")
            numbers = sorted({int(m[1]) for k in keys if (m := rx.match(k))})
            modules += [(name.replace(NUMBER, str(n)), numbered(mapping, str(n))) for n in numbers]
        return modules

    @cached_property
    def _underscored(self) -> tuple[re.Pattern, dict[str, tuple[str, dict[str, str]]], dict[str, str], tuple[tuple[re.Pattern, str], ...]]:
        """The BFL names with their dots written as `_`: a block key's regex (group, number, module), group ->
        (its BFL name, its modules), the modules outside the groups, the numbered ones as (regex, name)."""
        groups = {g.bfl.replace(".", "_"): (g.bfl, {n.replace(".", "_"): n for n in g.table}) for g in self.groups}
        block = re.compile(rf"({'|'.join(map(re.escape, groups))})_(\d+)_(.+)")
        outer = {n.replace(".", "_"): n for t in (self.top, self.final) for n in t if NUMBER not in n}
        return block, groups, outer, tuple((_number_pattern(name, "_"), name) for _, name, _ in self._numbered)

    def from_underscored(self, module: str) -> str | None:
        """A BFL module name with its dots written as `_` (kohya's LoRA keys) -> the name, or None."""
        block, groups, outer, numbers = self._underscored
        m = block.fullmatch(module)
        if m and m[3] in groups[m[1]][1]:
            return f"{groups[m[1]][0]}.{m[2]}.{groups[m[1]][1][m[3]]}"
        if module in outer:
            return outer[module]
        return next((name.replace(NUMBER, n[1]) for rx, name in numbers if (n := rx.fullmatch(module))), None)


# --- what else a family says ----------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoraTables:
    """LoRA key schemes a family's trainers write beyond the generic ones (kohya and ComfyUI on BFL names,
    diffusers/PEFT and OneTrainer on canonical names, which come from the tables themselves).

    `xlabs`: XLabs' processor keys, (group, index, processor); `xlabs_double`: a double-block processor -> the
    BFL module it changes; `xlabs_single_qkv`: what a single block's qkv_lora changes (rows of linear1);
    `replaced`: the canonical tensors a control LoRA holds whole and replaces; `control_hint`: what a LoRA
    whose input layer has another width than the model's is likely to be."""

    xlabs: re.Pattern | None = None
    xlabs_double: dict[str, str] = field(default_factory=dict)
    xlabs_single_qkv: Fused | None = None
    replaced: re.Pattern | None = None
    control_hint: str = ""


@dataclass(frozen=True)
class Fit:
    """A number of a preview pipeline's component config that the model's config must match:
    `component`/config.json `key` (dotted: nested) times `factor` == the model's `model_key`."""

    component: str
    key: str
    model_key: str
    what: str  # for the message: "T5's embeddings"
    factor: int = 1


@dataclass(frozen=True)
class Preview:
    """How to render a model of the family: the diffusers pipeline class, the default pipeline repo (text
    encoders, VAE, scheduler), and the sampling defaults. `modular`: diffusers offers the family only as a
    ModularPipeline (components loaded by `load_components`, run by blocks that encode their own prompts),
    which cannot be driven as the other pipelines are: previews are not offered for it.

    Prompts are encoded once, by the pipeline's own `encode_prompt` (with `encode_options`), before the
    transformer is loaded: `text_inputs` names what each of its outputs is passed to the pipeline's call as
    (None: not passed); `negative_inputs`, the same of the empty prompt's, for a pipeline whose call does
    classifier-free guidance against "" but whose `encode_prompt` encodes no negative prompt (its call would
    encode it, and previews load no text encoder there). `fits`: what of the pipeline must match the model's
    config. `by_pipeline`: models of the same shapes that only a setting of the pipeline tells apart, and how
    to render them (FLUX.2 klein's base models, with another pipeline than the family's default repo)."""

    pipeline: str
    repo: str
    steps: int
    guidance: float | None  # None: the model takes no guidance
    max_sequence_length: int
    modular: bool = False
    text_inputs: tuple[str | None, ...] = ("prompt_embeds",)
    encode_options: tuple[tuple[str, Any], ...] = ()
    negative_inputs: tuple[str | None, ...] = ()
    fits: tuple[Fit, ...] = ()
    by_pipeline: tuple[PipelineSetting, ...] = ()

    def not_offered(self, family: str) -> str:
        """The one line that says previews cannot render this model ('' when they can)."""
        if not self.modular:
            return ""
        return f"previews are not offered for {family}: diffusers offers it only as the modular {self.pipeline}, whose blocks load their own components and encode their own prompts"


@dataclass(frozen=True)
class PipelineSetting:
    """A pipeline whose model_index.json holds `key` = `value` (absent: the pipeline class's default) is made for
    another model of the same shapes than the family's default repo's, rendered as `preview` says (FLUX.2 klein:
    `is_distilled` false, a base model: more steps, classifier-free guidance)."""

    key: str
    value: Any
    preview: Preview


def required(shapes: Shapes, key: str, dims: int, model: str) -> tuple[int, ...]:
    """The shape of a tensor every `model` transformer has; ShapeError when it is missing, or not `dims`-D and
    non-empty."""
    if key not in shapes:
        raise ShapeError(f"lacks '{cut(key)}', which every {model} transformer has")
    shape = shapes[key]
    if len(shape) != dims or not all(shape):
        raise ShapeError(f"'{cut(key)}' is {list(shape)}: a {model} transformer's is {dims}-D and not empty")
    return shape


def no_hint(missing: list[str], unexpected: list[str], config: dict[str, Any]) -> str:
    return ""


class ShapeError(ValueError):
    """A tensor every model of the family has is missing, or its shape is not one it can have."""


@dataclass(frozen=True, eq=False)
class Family:
    """One kind of model. The fields are the family's facts; the methods derive the rest from them."""

    name: str  # "FLUX.1"
    class_name: str  # its diffusers model class
    fingerprints: tuple[str, ...]  # regexes: a key of its files (either layout, without ComfyUI's prefix) matches one
    bfl: BflTable
    derive_config: Callable[[Shapes, str | None], tuple[dict[str, Any], list[str]]]  # shapes, diffusers version -> config, notes
    variant: Callable[[Shapes], str]  # "schnell", "klein 4B (width 32, 2+2 blocks)", ...
    preview: Callable[[dict[str, Any]], Preview]  # from the model's config
    summary: Callable[[dict[str, Any]], str]  # a derived config's telling values, for the plan: 'guidance_embeds: true, ...'
    licences: str  # its models' licences, for the model card of a merge
    lora: LoraTables = field(default_factory=LoraTables)
    # what to tell a user whose output lacks keys its config needs, or holds keys it has no place for
    config_hint: Callable[[list[str], list[str], dict[str, Any]], str] = no_hint
    # the canonical tensors an fp8 export keeps in bf16 (None: high_precision's rule)
    kept_in_bf16: Callable[[str, tuple[int, ...]], bool] | None = None
    comfyui_prefixes: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")  # the first is written
    max_blocks: int = 100  # a config's block count (num_layers, ...) at most: a bound against hostile configs
    max_size: int = 1 << 16  # any other whole number of a config (a width, a channel count) at most
    # regex of a key -> the model of the family it marks, which fluxrecipe knows and does not merge
    refused: dict[str, str] = field(default_factory=dict)
    # regexes of keys its files may hold that are no part of the model (training-only heads): read past, counted
    skipped: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # the config's yes/no fields that tell its variants apart, shown in the plan

    def __str__(self) -> str:
        return self.name

    # --- recognition

    @cached_property
    def _fingerprints(self) -> tuple[re.Pattern, ...]:
        return tuple(re.compile(p) for p in self.fingerprints)

    def recognises(self, keys: Iterable[str]) -> bool:
        """Whether keys (a file's, without ComfyUI's prefix, or canonical ones) are this family's."""
        return any(rx.search(k) for k in keys for rx in self._fingerprints)

    @cached_property
    def bfl_markers(self) -> tuple[str, ...]:
        """Key prefixes only the BFL layout has: its block groups (those named apart from diffusers'), its input
        layer, its final modules."""
        firsts = [self.bfl.hidden.split(".")[0], *(m.split(".")[0] for m in self.bfl.final)]
        return tuple(dict.fromkeys([g.bfl + "." for g in self.bfl.groups if g.bfl != g.canonical] + [f + "." for f in firsts]))

    @cached_property
    def diffusers_markers(self) -> tuple[str, ...]:
        """Key prefixes only the diffusers layout has: its block groups (those named apart from BFL's) and its
        input layer."""
        return tuple(g.canonical + "." for g in self.bfl.groups if g.bfl != g.canonical) + (self.hidden_key.rsplit(".", 1)[0] + ".",)

    def refusal(self, keys: Iterable[str]) -> tuple[str, str] | None:
        """(the model, the key that marks it) when keys are a model of the family fluxrecipe does not merge."""
        return next(((model, k) for k in keys for pattern, model in self.refused.items() if re.search(pattern, k)), None)

    def skips(self, key: str) -> bool:
        """Whether a key of the family's files is no part of the model (and is read past)."""
        return any(re.search(pattern, key) for pattern in self.skipped)

    def is_bfl(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(self.bfl_markers) for k in keys)

    def is_diffusers(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(self.diffusers_markers) for k in keys)

    # --- shapes

    @cached_property
    def hidden_key(self) -> str:
        """The canonical tensor whose dim 0 is the model's width (the input layer's weight)."""
        module, _, param = self.bfl.hidden.rpartition(".")
        return f"{targets(({**self.bfl.top, **self.bfl.final})[module])[0]}.{param}"

    def width(self, shapes: Shapes) -> int | None:
        shape = shapes.get(self.hidden_key)
        return shape[0] if shape else None

    def describe(self, shapes: Shapes) -> str:
        """'FLUX.1 schnell', 'FLUX.2 klein 4B': the family and the variant its shapes say."""
        variant = self.variant(shapes)
        return f"{self.name} {variant}" if variant else self.name

    def count(self, keys: Iterable[str], group: str) -> int:
        """How many blocks of a group (BFL or canonical name) canonical keys hold: the highest index + 1."""
        canonical = self.bfl.group(group).canonical
        indexes = {int(m[2]) for k in keys if (m := self.bfl.canonical_pattern.match(k)) and m[1] == canonical}
        return max(indexes) + 1 if indexes else 0

    def high_precision(self, key: str, shape: tuple[int, ...]) -> bool:
        """Whether an fp8 export keeps a canonical tensor in bf16 (the dtype fp8_mixed): the family's rule, or
        the one ComfyUI's fp8 FLUX files follow: 1-D tensors (biases, norms) and the tensors outside the
        blocks (embedders, shared modulation, final layer), which run once per step and are small."""
        if self.kept_in_bf16:
            return self.kept_in_bf16(key, shape)
        return len(shape) < 2 or self.block_of(key) in (*self.top_blocks, *self.final_blocks)

    # --- blocks: the names schedules and messages use (ComfyUI's: the first part of BFL's module names)

    @cached_property
    def _module_blocks(self) -> tuple[dict[str, str], tuple[tuple[re.Pattern, str], ...]]:
        """Canonical module outside the groups -> its block; and the numbered ones' as (regex, block)."""
        modules = [(t, name.split(".")[0]) for table in (self.bfl.top, self.bfl.final) for name, m in table.items() for t in targets(m)]
        return {t: b for t, b in modules if NUMBER not in t}, tuple((_number_pattern(t), b) for t, b in modules if NUMBER in t)

    @cached_property
    def top_blocks(self) -> tuple[str, ...]:
        """The blocks before the groups, in model order (embedders, shared modulation)."""
        return tuple(dict.fromkeys(name.split(".")[0] for name in self.bfl.top))

    @cached_property
    def final_blocks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name.split(".")[0] for name in self.bfl.final))

    @cached_property
    def groups(self) -> tuple[str, ...]:
        """The block groups by their BFL names ('double_blocks', 'single_blocks'), in model order."""
        return tuple(g.bfl for g in self.bfl.groups)

    def block_of(self, key: str) -> str | None:
        """The block of a canonical key: 'img_in', ..., 'double_blocks.7', 'single_blocks.12', 'final_layer';
        None for a key the family's table does not hold."""
        m = self.bfl.canonical_pattern.match(key)
        if m:
            return f"{self.bfl.group(m[1]).bfl}.{m[2]}"
        module = key.rsplit(".", 1)[0]
        exact, numbers = self._module_blocks
        return exact.get(module) or next((b for rx, b in numbers if rx.fullmatch(module)), None)

    def block_order(self, block: str) -> tuple[int, int]:
        """Model order: the blocks before the groups, each group's blocks by index, the final blocks."""
        group, _, index = block.rpartition(".")
        if group in self.groups and index.isdigit():
            return (1 + self.groups.index(group), int(index))
        if block in self.top_blocks:
            return (0, self.top_blocks.index(block))
        return (1 + len(self.groups), self.final_blocks.index(block) if block in self.final_blocks else len(self.final_blocks))

    def diagnostic_block(self, key: str) -> str:
        """The block diagnostics report a key under, in canonical names: 'transformer_blocks.7', 'embedders'
        (everything before the blocks) or 'output' (after them)."""
        m = self.bfl.canonical_pattern.match(key)
        if m:
            return f"{m[1]}.{m[2]}"
        return "output" if self.block_of(key) in self.final_blocks else "embedders"
