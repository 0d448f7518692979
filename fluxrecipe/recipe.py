"""The recipe loader: a recipe file read within bounds, its typed schema, and every check that needs no
source file. The one module below the command layer that knows OmegaConf (a recipe's interpolations are
OmegaConf's), which is why the reader, the schema and the checks stay one module of some 700 lines.

A recipe file from a stranger is read lazily and within bounds (load_recipe_file): a file that is too large,
not UTF-8, not YAML, or whose YAML aliases would expand past a limit becomes a note of its error, so that
choosing it gives that error in one line and choosing any other recipe is not affected. A recipe arrives as
an OmegaConf node composed by Hydra (or as plain data, from the Python API). It is checked twice over: first as written (no
interpolation may call a resolver, so a shared recipe cannot read the environment or run anything), then as
resolved plain data: known fields and types, regexes that compile, ops that parse with arguments that fit,
source names that exist, parameters that a rule uses. Errors name the recipe file and line where it can be
found.

A rule's `match` is a stranger's regular expression: it is run by the `regex` package (the syntax of Python's
`re`) with a time bound on every search and one on all the searches of a recipe together, so a pattern that
backtracks catastrophically is an error, not a hang, however many rules and keys there are. A search's
result is remembered, so planning again (a sweep's jobs, the API) costs no second search. (google-re2 would
have no backtracking at all, but it lacks the lookarounds and backreferences that `re` users write, such as
`^(?!single_)`.)
"""

from __future__ import annotations

import difflib
import io
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import schedule
from .errors import RecipeError
from .files import os_error_text, read_small
from .formats import FORMATS as _FORMATS
from .formats.gguf import OUTPUT_TYPES as GGUF_TYPES
from .ops import OPS, OpCall, parse_op
from .ops.registry import check_values
from .text import cut, printable

# Output dtypes by name -> (safetensors dtype, scaled): fp8 is float8_e4m3fn; fp8_scaled stores value / scale
# with a per-tensor scale = absmax / 448, as ComfyUI reads it (single-file formats only); fp8_mixed is fp8
# except the tensors the model's family keeps in high precision (MIXED: those are written as bf16).
DTYPES = {
    "bf16": ("BF16", False), "bfloat16": ("BF16", False),
    "fp16": ("F16", False), "float16": ("F16", False),
    "fp32": ("F32", False), "float32": ("F32", False),
    "fp8": ("F8_E4M3", False), "fp8_e4m3fn": ("F8_E4M3", False), "float8_e4m3fn": ("F8_E4M3", False),
    "fp8_e5m2": ("F8_E5M2", False), "float8_e5m2": ("F8_E5M2", False),
    "fp8_scaled": ("F8_E4M3", True),
    "fp8_mixed": ("F8_E4M3", False),
    "f16": ("F16", False), "f32": ("F32", False),
    **{t.name.lower(): (t.name, False) for t in GGUF_TYPES if t.name not in ("BF16", "F16", "F32")},  # format=gguf only
}
MIXED = {"fp8_mixed": "bf16"}  # a mixed dtype -> the dtype of the tensors the family keeps in high precision
DTYPE_NAMES = "bf16, fp16, fp32, fp8, fp8_e5m2, fp8_scaled, fp8_mixed; with format=gguf " + ", ".join(t.name.lower() for t in GGUF_TYPES)
FORMATS = tuple(_FORMATS)
RECIPE_FIELDS = ("description", "sources", "base", "rules", "dtype", "config", "format", "loras", "mix_families")
# Recipe parameters the command line overrides one block of (`recipe.alpha.GROUP.7=V`), set by the command
# line (cli/arguments.py) for the recipe loader in this process and the sweep's job processes: numbers among
# them become `{default: N}`, so that the block can be added to them.
BLOCK_OVERRIDES_ENV = "FLUXRECIPE_BLOCK_OVERRIDES"
RULE_FIELDS = ("match", "op", "sources", "optional", "dtype")
SOURCE_FIELDS = ("repo", "revision", "subfolder", "path", "demo", "content_hash")
LORA_FIELDS = ("path", "repo", "file", "revision", "strength", "ignore_unmatched", "content_hash")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
# The only interpolation a recipe may hold: a reference to one of its own values.
SAFE_INTERPOLATION = re.compile(r"\$\{(?:recipe\.|\.+)[A-Za-z_][\w.-]*\}")
RELATIVE = re.compile(r"\$\{(\.+)")
RECIPE_REFERENCE = re.compile(r"\$\{recipe\.([A-Za-z_][\w.-]*)\}")  # an interpolation of a recipe value, with its path
REFERENCE = re.compile(r"\$\{(?:recipe\.|\.+)([A-Za-z_][\w-]*)")  # the recipe value an interpolation names first
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a megabyte is a thousand rules
MAX_RECIPE_NODES = 20_000  # YAML values once aliases are expanded (a 300-byte alias bomb expands to billions)
MATCH_SECONDS = 0.25  # the most one search of a rule's regex may take (a sane one takes microseconds on a key)
MATCH_BUDGET_SECONDS = 5.0  # the most all the searches of one recipe's rules may take together (FLUX: 1,156 keys x its rules)
MATCH_MEMORY = 1 << 17  # (regex, key) results remembered at most: a FLUX plan with 100 rules needs ~1e5
_matched: dict[tuple[str, str], bool] = {}  # (regex, key) -> whether it matches, for every recipe of the process
clock = time.perf_counter  # what the searches' seconds are counted with (a test sets a clock it controls)


@dataclass(frozen=True)
class SourceSpec:
    """Where a source lives, as the recipe says it; `sources.py` turns it into files."""

    name: str
    path: str | None = None  # local folder or .safetensors file
    repo: str | None = None  # hub repo id
    revision: str | None = None
    subfolder: str | None = None
    demo: str | None = None  # a generated demo checkpoint (see demo.py)
    text: str | None = None  # the string the recipe gave, when it gave one
    recipe_dir: str | None = None  # the recipe file's folder: a relative path is found from there first
    content_hash: str | None = None  # what a pinned recipe read before: a replay must read the same bytes

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.demo:
            return f"demo:{self.demo}"
        if self.repo:
            return self.repo + (f"@{self.revision}" if self.revision else "") + (f" [{self.subfolder}]" if self.subfolder else "")
        return str(self.path) + (f" [{self.subfolder}]" if self.subfolder else "")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA the recipe bakes into its result: where its file lives, how strongly it applies, and whether
    keys of it that map to no tensor of the output only warn (`ignore_unmatched`) instead of stopping."""

    name: str
    path: str | None = None  # a local .safetensors file, or a folder holding one
    repo: str | None = None  # a hub repo id, with `file` the file in it
    file: str | None = None
    revision: str | None = None
    strength: Any = 1.0  # a number or a per-block schedule.Schedule (loras.strength_of gives a key its number)
    ignore_unmatched: bool = False
    where: str = ""  # "recipe 'x' (path:line) loras.NAME", for messages
    recipe_dir: str | None = None  # the recipe file's folder: a relative path is found from there first
    content_hash: str | None = None  # what a pinned recipe read before: a replay must read the same bytes

    def describe(self) -> str:
        if self.repo:
            return f"{self.repo}/{self.file}" + (f"@{self.revision}" if self.revision else "")
        return str(self.path)


@dataclass
class MatchBudget:
    """The search time of one recipe's rules, shared by them: all of it is bounded, not only each search."""

    spent: float = 0.0
    by_rule: dict[tuple[str, str], float] = field(default_factory=dict)  # (rule's location, its regex) -> seconds


@dataclass(frozen=True)
class Rule:
    index: int
    match: str
    pattern: regex.Pattern
    op: OpCall
    sources: tuple[str, ...]  # the inputs, in order (the recipe's sources unless the rule names them)
    optional: bool
    where: str  # "recipe 'x' (path:line) rules[i]", for messages
    dtype: str | None = None  # the output dtype of its keys, by name (None: the recipe's)
    params: dict[str, Any] = field(default_factory=dict)  # the op's parameters, checked, defaults filled in (schedules as schedule.Schedule)
    param_where: dict[str, str] = field(default_factory=dict)  # parameter -> where the recipe gives it, for plan-time messages
    budget: MatchBudget = field(default_factory=MatchBudget, compare=False, repr=False)  # shared by the recipe's rules

    def describe(self) -> str:
        return describe_rule(self.index, self.match, self.op)

    def matches(self, key: str) -> bool:
        """`match` is found in the key (re.search semantics), within MATCH_SECONDS, and within what is left of
        the MATCH_BUDGET_SECONDS of all the recipe's searches."""
        found = _matched.get((self.match, key))
        if found is not None:
            return found
        left = MATCH_BUDGET_SECONDS - self.budget.spent
        started = clock()
        try:
            if left <= 0:
                raise TimeoutError
            found = self.pattern.search(key, timeout=min(MATCH_SECONDS, left)) is not None
        except TimeoutError:
            if left > MATCH_SECONDS:
                raise RecipeError(
                    f"{self.where}.match: {cut(self.match)!r} took more than {MATCH_SECONDS} s on the key {cut(key)!r}: it backtracks "
                    "catastrophically (a repetition of a repetition, such as (\\w+\\.?)+); write it without nested repetition"
                ) from None
            raise RecipeError(self._over_budget()) from None
        finally:
            elapsed = clock() - started
            self.budget.spent += elapsed
            self.budget.by_rule[self.where, self.match] = self.budget.by_rule.get((self.where, self.match), 0.0) + elapsed
        if len(_matched) < MATCH_MEMORY:
            _matched[(self.match, key)] = found
        return found

    def _over_budget(self) -> str:
        (where, match), seconds = max(self.budget.by_rule.items(), key=lambda item: item[1])
        return (
            f"{where}.match: {cut(match)!r} took {seconds:.1f} s of the {MATCH_BUDGET_SECONDS} s all the recipe's regexes may take on the "
            "model's keys: it backtracks on every key (as (.*)(.*)\\2\\1, or a repetition of a repetition such as (\\w+\\.?)+ does); "
            "write it without that"
        )


def describe_rule(index: int, match: str, op: OpCall) -> str:
    """A rule as messages name it."""
    return f"rules[{index}] (match {match!r}, op {op})"


@dataclass(frozen=True)
class Recipe:
    name: str
    file: str | None
    description: str
    sources: dict[str, SourceSpec]
    base: str
    rules: tuple[Rule, ...]
    dtype: str  # the output dtype by name (DTYPES), for keys whose rule names none
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the base's config.json
    format: str | None = None  # the output format the recipe asks for (a run's `format=` wins)
    params: dict[str, Any] = field(default_factory=dict)  # named parameters (alpha, ...)
    resolved: dict[str, Any] = field(default_factory=dict)  # the whole recipe as plain data, interpolations resolved
    written: dict[str, Any] = field(default_factory=dict)  # the same as composed, interpolations kept (${recipe.alpha})
    loras: dict[str, LoraSpec] = field(default_factory=dict)  # baked into the rules' result, in this order
    mix_families: bool = False  # sources of another family (or width) than the base give the tensors they share with it


def addressable_schedules(data: dict) -> tuple[dict, list[str]]:
    """The recipe with each schedule (a parameter's list or mapping, a LoRA's strength) in the shape whose
    blocks Hydra can override one by one (schedule.addressable), and the dotted paths of those schedules."""
    if not isinstance(data, dict):
        return data, []
    wanted = set(filter(None, os.environ.get(BLOCK_OVERRIDES_ENV, "").split(",")))
    places = [(data, key, key) for key in data if key not in RECIPE_FIELDS]
    loras = data.get("loras")
    if isinstance(loras, dict):
        places += [(spec, "strength", f"loras.{name}.strength") for name, spec in loras.items() if isinstance(spec, dict) and "strength" in spec]
    paths = []
    for holder, key, path in places:
        value = holder[key]
        if schedule.is_number(value) and path in wanted:
            value = {"default": value}
        if schedule.is_schedule_like(value):
            holder[key] = schedule.addressable(value)
            paths.append(path)
    return data, paths


def load_recipe_file(path: Path) -> DictConfig:
    """A recipe file as a config node (Hydra's recipe group loads it so), or a node holding only
    `__load_error__` (load_recipe raises it): a file from a stranger, read within bounds."""
    try:
        text = read_small(path, MAX_RECIPE_BYTES).decode("utf-8")
    except OSError as e:
        return _error_node(f"cannot read it: {os_error_text(e)}")
    except UnicodeDecodeError as e:
        return _error_node(f"not a valid YAML file: not utf-8 text ({e})")
    try:
        nodes = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if nodes > MAX_RECIPE_NODES:
            return _error_node(f"its YAML expands to more than {MAX_RECIPE_NODES} values (anchors and aliases?): a recipe is far smaller")
        node = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        return _error_node(f"not a valid YAML file: {e}")
    except RecursionError:
        return _error_node("not a valid YAML file: nested too deeply")
    except Exception as e:  # noqa: BLE001 - whatever OmegaConf refuses (a key that is not text, ...) is the file's fault
        return _error_node(f"not a valid recipe file: {type(e).__name__}: {e}")
    if isinstance(node, DictConfig):  # schedules as Hydra can override one block of (addressable_schedules)
        node, schedules = addressable_schedules(schedule.string_keys(OmegaConf.to_container(node, resolve=False)))
        node = OmegaConf.create(node)
        for path in schedules:  # a block a schedule does not name yet may be set without `+`
            OmegaConf.set_struct(OmegaConf.select(node, path), False)
    if isinstance(node, DictConfig) and "defaults" in node:
        # Hydra would act on it: pull other configs in at any package (`/recipe@_global_: x` puts a file's
        # `hydra.callbacks` at the top, and Hydra instantiates those), so a recipe could run code.
        return _error_node("a recipe may not have a `defaults` list (Hydra would compose other configs from it); remove it")
    return node


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values the YAML tree holds once every alias is expanded; stops counting past the limit (so a
    recursive alias is caught too)."""
    count, stack = 0, [root] if root is not None else []
    while stack and count <= MAX_RECIPE_NODES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(v for pair in node.value for v in pair)
    return count


def _error_node(message: str) -> DictConfig:
    return OmegaConf.create({"__load_error__": message.replace("${", "$ {")})


def read_recipe_file(path: Path) -> dict:
    """A recipe file's values as plain data (interpolations kept), read within bounds; RecipeError otherwise."""
    node = load_recipe_file(path)
    if "__load_error__" in node:
        raise RecipeError(f"{path}: {node['__load_error__']}")
    return OmegaConf.to_container(node, resolve=False)


def load_recipe(node: DictConfig | dict, name: str, file: str | None = None) -> Recipe:
    """Check and type a composed recipe node (or the same values as plain data, their ${recipe.NAME}
    references among themselves); raises RecipeError naming the fault."""
    if isinstance(node, dict):
        node = OmegaConf.create({"recipe": node}).recipe
    here = _Locator(name, file)
    raw = OmegaConf.to_container(node, resolve=False)
    if not isinstance(raw, dict):
        raise RecipeError(f"{here.at(())}: a recipe is a mapping of fields, got {type(raw).__name__}")
    if "__load_error__" in raw:
        raise RecipeError(f"{here.at(())}: {raw['__load_error__']}")
    _refuse_resolvers(raw, (), here)
    mapped = _schedule_arguments_as_mappings(raw)
    if mapped is not raw:
        node = OmegaConf.create({"recipe": mapped}).recipe
    try:
        data = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as e:
        path = _path_of(getattr(e, "full_key", "") or "", mapped)
        value = _get(raw, path)
        reason = str(getattr(e, "msg", None) or e).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        what = f"{value!r}" if isinstance(value, str) else "a value"
        raise RecipeError(f"{here.at(path)}: cannot resolve {what}: {reason}") from None
    return _parse(data, raw, mapped, here)


def _path_of(full_key: str, raw: dict) -> tuple:
    """'recipe.rules[0].op' (as OmegaConf names a node from the config's root) -> ('rules', 0, 'op'); the
    nearest path the recipe holds."""
    parts = [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", full_key)]
    if parts and parts[0] == "recipe" and "recipe" not in raw:
        parts = parts[1:]
    while parts and _get(raw, tuple(parts)) is None:
        parts.pop()
    return tuple(parts)


def _schedule_arguments_as_mappings(raw: dict) -> dict:
    """`op: lerp:${recipe.alpha}` where alpha is a list or a mapping (a per-block schedule) becomes
    `op: {lerp: {alpha: ${recipe.alpha}}}`: OmegaConf would format the schedule into the op's text
    ('lerp:[0, 1]'), while as the parameter's whole value it resolves to the schedule itself. Only an
    argument that is exactly one ${recipe.NAME} is moved; `raw` itself is returned when nothing changes."""
    rules = raw.get("rules")
    if not isinstance(rules, list):
        return raw
    mapped = [_op_as_mapping(rule, raw) for rule in rules]
    return raw if all(m is r for m, r in zip(mapped, rules)) else {**raw, "rules": mapped}


def _op_as_mapping(rule: Any, raw: dict) -> Any:
    op = rule.get("op") if isinstance(rule, dict) else None
    name, colon, rest = op.partition(":") if isinstance(op, str) else ("", "", "")
    spec = OPS.get(name.strip())
    if not colon or spec is None or not spec.shorthand:
        return rule
    args = [a.strip() for a in rest.split(",")]
    references = [RECIPE_REFERENCE.fullmatch(a) for a in args]
    if not any(m and isinstance(_get(raw, tuple(m[1].split("."))), (list, dict)) for m in references):
        return rule
    values = [a if m else _literal(a) for a, m in zip(args, references)]
    first = spec.param(spec.shorthand[0])
    if first.kind in ("numbers", "task_weights"):
        params = {first.name: values}
    elif len(values) <= len(spec.shorthand):
        params = dict(zip(spec.shorthand, values))
    else:
        return rule  # too many arguments: parse_op says so
    return {**rule, "op": {spec.name: params}}


def _literal(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _refuse_resolvers(value: Any, path: tuple, here: "_Locator") -> None:
    """Interpolations may refer to the recipe's own values, nothing else (no oc.env, no hydra:...)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_resolvers(v, path + (k,), here)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_resolvers(v, path + (i,), here)
    elif isinstance(value, str) and "${" in value:
        # ${.x} is a sibling of the value, each further dot one level up: more dots than the value is deep
        # leave the recipe (${..output} in `description` reads the run's config).
        escapes = any(len(dots) > len(path) for dots in RELATIVE.findall(value))
        if escapes or value.count("${") != len(SAFE_INTERPOLATION.findall(value)):
            raise RecipeError(
                f"{here.at(path)}: {value!r}: a recipe may only refer to its own values, as ${{recipe.NAME}}; "
                "resolvers (oc.env, oc.decode, hydra:, ...) and outside references are refused so that a shared recipe cannot read your environment"
            )


def _parse(data: dict, written: dict, mapped: dict, here: "_Locator") -> Recipe:
    params = {}
    for key, value in data.items():
        if key in RECIPE_FIELDS:
            continue
        if not isinstance(key, str) or not NAME.fullmatch(key):
            raise RecipeError(f"{here.at((key,))}: {key!r} is not a valid field or parameter name")
        close = difflib.get_close_matches(key, RECIPE_FIELDS, n=1, cutoff=0.8)
        if schedule.is_schedule_like(value) and not close:
            try:
                schedule.parse(value)
            except ValueError as e:
                raise RecipeError(f"{here.at((key,))}: parameter {key!r}: {e}") from None
        elif not schedule.is_number(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise RecipeError(
                f"{here.at((key,))}: unknown field {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}, or a parameter that is not a number: got {shown} "
                f"(fields: {', '.join(RECIPE_FIELDS)}; any other top-level value is a named parameter and must be a number or a per-block schedule)"
            )
        params[key] = value

    description = data.get("description") or ""
    if not isinstance(description, str):
        raise RecipeError(f"{here.at(('description',))}: description must be text")

    if data.get("sources") is None and data.get("loras"):  # LoRAs alone: combined as LoRAs (lora_space.py)
        return _lora_space(data, written, params, here, description)
    sources = _sources(data.get("sources"), here)
    base = data.get("base", next(iter(sources)))
    if base not in sources:
        raise RecipeError(f"{here.at(('base',))}: base {base!r} is not one of the sources ({', '.join(sources)})")

    dtype = _dtype(data.get("dtype", "bf16"), here.at(("dtype",)))
    output_format = data.get("format")
    if output_format is not None and output_format not in FORMATS:
        raise RecipeError(f"{here.at(('format',))}: format {output_format!r} is not one of {', '.join(FORMATS)}")

    mix_families = data.get("mix_families", False)
    if not isinstance(mix_families, bool):
        raise RecipeError(f"{here.at(('mix_families',))}: mix_families must be true or false, got {mix_families!r}")

    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise RecipeError(f"{here.at(('config',))}: config must be a mapping of config.json values to override")

    rules_data = data.get("rules")
    if not isinstance(rules_data, list) or not rules_data:
        raise RecipeError(f"{here.at(('rules',))}: rules must be a non-empty list of {{match, op}} entries")
    written_rules = mapped["rules"] if isinstance(mapped.get("rules"), list) else [None] * len(rules_data)
    budget = MatchBudget()
    rules = tuple(_rule(i, r, w, sources, here, budget) for i, (r, w) in enumerate(zip(rules_data, written_rules)))
    loras = _loras(data.get("loras"), here)
    _refuse_unused_parameters(params, written, here)
    if "dtype" in data and all(rule.dtype is not None for rule in rules):
        raise RecipeError(
            f"{here.at(('dtype',))}: dtype {data['dtype']} changes nothing: every rule sets its own dtype; set the dtype of the "
            f"rules it should apply to instead (e.g. recipe.rules.{len(rules) - 1}.dtype={data['dtype']})"
        )

    return Recipe(
        name=here.name,
        file=here.file,
        description=description,
        sources=sources,
        base=base,
        rules=rules,
        dtype=dtype,
        config=config,
        format=output_format,
        params=params,
        resolved=data,
        written=written,
        loras=loras,
        mix_families=mix_families,
    )


def _lora_space(data: dict, written: dict, params: dict[str, Any], here: "_Locator", description: str) -> Recipe:
    """A recipe with `loras:` and no `sources:`: the LoRAs combined as one LoRA, no model read. What only a
    model's tensors would use (rules, a base, config, mix_families) is refused, as are named parameters."""
    for name in ("rules", "base", "config", "mix_families"):
        if data.get(name) is not None:
            raise RecipeError(f"{here.at((name,))}: {name} changes nothing in a recipe without sources: its LoRAs are combined as one LoRA, no model is read; remove it, or name the model in `sources:`")
    if params:
        raise RecipeError(f"{here.at((next(iter(params)),))}: parameter {next(iter(params))!r} changes nothing in a recipe without sources and rules; remove it")
    output_format = data.get("format")
    if output_format is not None and output_format not in FORMATS:
        raise RecipeError(f"{here.at(('format',))}: format {output_format!r} is not one of {', '.join(FORMATS)}")
    return Recipe(
        name=here.name, file=here.file, description=description, sources={}, base="", rules=(), dtype=_dtype(data.get("dtype", "bf16"), here.at(("dtype",))),
        format=output_format, resolved=data, written=written, loras=_loras(data.get("loras"), here),
    )


def _refuse_unused_parameters(params: dict[str, Any], written: dict, here: "_Locator") -> None:
    """A parameter no rule refers to changes nothing: almost always a typo (`+recipe.alhpa=0.3` merges at the
    recipe's alpha), so it is refused. A parameter counts as used where any value of the recipe other than its
    description refers to it, directly or through another used parameter."""
    used = _references({k: v for k, v in written.items() if k not in params and k != "description"})
    frontier = used
    while frontier:
        frontier = _references([written[k] for k in frontier if k in params]) - used
        used |= frontier
    for name in params:
        if name not in used:
            close = difflib.get_close_matches(name, sorted((used & set(written)) | set(RECIPE_FIELDS)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise RecipeError(
                f"{here.at((name,))}: parameter {name!r} is used by no rule{hint}: it would change nothing; "
                f"a rule uses a parameter as ${{recipe.{name}}} (on the command line, `~recipe.{name}` removes it)"
            )


def _references(value: Any) -> set[str]:
    """The names of recipe values that the interpolations inside `value` refer to."""
    if isinstance(value, dict):
        return set().union(*(_references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_references(v) for v in value))
    return set(REFERENCE.findall(value)) if isinstance(value, str) else set()


def _dtype(value: Any, where: str) -> str:
    name = str(value).lower()
    if name not in DTYPES:
        raise RecipeError(f"{where}: dtype {value!r} is not one of {DTYPE_NAMES}")
    return name


def _sources(value: Any, here: "_Locator") -> dict[str, SourceSpec]:
    recipe_dir = os.path.dirname(here.file) if here.file else None
    if not isinstance(value, dict) or not value:
        raise RecipeError(f"{here.at(('sources',))}: sources must be a non-empty mapping of name -> path or hub repo id")
    specs = {}
    for name, spec in value.items():
        where = here.at(("sources", name))
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RecipeError(f"{where}: source name {name!r} must be letters, digits, '_' or '-', starting with a letter")
        if spec is None or spec == "":
            raise RecipeError(f"{where}: source {name!r} has no value: give a path or a hub repo id (recipe.sources.{name}=...)")
        if isinstance(spec, str):
            specs[name] = SourceSpec(name=name, text=spec, recipe_dir=recipe_dir)  # sources.py decides: local path or hub repo
            continue
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: source {name!r} must be a path, a hub repo id, or a mapping of {', '.join(SOURCE_FIELDS)}")
        unknown = set(spec) - set(SOURCE_FIELDS)
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, sorted(map(str, unknown))))} in source {name!r} (fields: {', '.join(SOURCE_FIELDS)})")
        if sum(spec.get(k) is not None for k in ("repo", "path", "demo")) != 1:
            raise RecipeError(f"{where}: source {name!r} needs exactly one of repo, path or demo")
        for k, v in spec.items():
            if v is not None and not isinstance(v, str):
                raise RecipeError(f"{where}: {k} of source {name!r} must be text, got {v!r}")
        specs[name] = SourceSpec(name=name, recipe_dir=recipe_dir, **{k: v for k, v in spec.items() if v is not None})
    return specs


def _loras(value: Any, here: "_Locator") -> dict[str, LoraSpec]:
    """`loras:` name -> a local file (`path`, or the path as the whole value) or a hub file (`repo` + `file`),
    with `strength` (default 1) and `ignore_unmatched` (default false)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"{here.at(('loras',))}: loras must be a mapping of name -> {{path: FILE, strength: NUMBER}} or {{repo: ORG/NAME, file: FILE, ...}}")
    specs = {}
    for name, spec in value.items():
        where = here.at(("loras", name))
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise RecipeError(f"{where}: LoRA name {name!r} must be letters, digits, '_' or '-', starting with a letter")
        if isinstance(spec, str) and spec:
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise RecipeError(f"{where}: LoRA {name!r} must be a path or a mapping of {', '.join(LORA_FIELDS)}")
        unknown = set(spec) - set(LORA_FIELDS)
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, sorted(map(str, unknown))))} in LoRA {name!r} (fields: {', '.join(LORA_FIELDS)})")
        for k in ("path", "repo", "file", "revision", "content_hash"):
            if spec.get(k) is not None and (not isinstance(spec[k], str) or not spec[k]):
                raise RecipeError(f"{here.at(('loras', name, k))}: {k} of LoRA {name!r} must be text, got {spec[k]!r}")
        if spec.get("path") is None and spec.get("repo") is None:
            raise RecipeError(f"{where}: LoRA {name!r} has no file: give its path (recipe.loras.{name}.path=FILE) or a hub repo and the file in it")
        if spec.get("path") is not None and spec.get("repo") is not None:
            raise RecipeError(f"{where}: LoRA {name!r} gives both path and repo: give one")
        if spec.get("repo") is not None and spec.get("file") is None:
            raise RecipeError(f"{where}: LoRA {name!r} names repo {spec['repo']!r} but no file: give the .safetensors file in it (file: NAME.safetensors)")
        if spec.get("file") is not None and not _inside_repo(spec["file"]):
            raise RecipeError(
                f"{here.at(('loras', name, 'file'))}: file of LoRA {name!r} must be a path inside the repo (relative, '/' between folders, "
                f"no '..'), e.g. file: lora.safetensors, got {printable(spec['file'])!r}"
            )
        if spec.get("path") is not None and (spec.get("file") is not None or spec.get("revision") is not None):
            raise RecipeError(f"{where}: LoRA {name!r}: file and revision go with repo, not with path")
        try:
            strength = schedule.parse(spec.get("strength", 1.0))
        except ValueError as e:
            raise RecipeError(f"{here.at(('loras', name, 'strength'))}: strength of LoRA {name!r} {e}") from None
        ignore = spec.get("ignore_unmatched", False)
        if not isinstance(ignore, bool):
            raise RecipeError(f"{here.at(('loras', name, 'ignore_unmatched'))}: ignore_unmatched must be true or false")
        specs[name] = LoraSpec(
            name, spec.get("path"), spec.get("repo"), spec.get("file"), spec.get("revision"), strength, ignore, where,
            os.path.dirname(here.file) if here.file else None, spec.get("content_hash"),
        )
    return specs


def _inside_repo(file: str) -> bool:
    """A file name of a hub repo: relative, '/'-separated, no '..' (huggingface_hub refuses the rest with a
    ValueError deep in a download; the recipe's line says it first)."""
    parts = file.split("/")
    return not ("\\" in file or file.startswith("/") or re.match(r"[A-Za-z]:", file) or any(p in ("", ".", "..") for p in parts))


def _rule(index: int, value: Any, written: Any, sources: dict[str, SourceSpec], here: "_Locator", budget: MatchBudget) -> Rule:
    """One rule, checked: `value` as resolved, `written` as the recipe gives it (interpolations kept)."""
    where = here.at(("rules", index))
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: a rule is a mapping with match and op, got {value!r}")
    unknown = set(value) - set(RULE_FIELDS)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, sorted(map(str, unknown))))} (rule fields: {', '.join(RULE_FIELDS)})")
    match = value.get("match")
    if not isinstance(match, str) or not match:
        raise RecipeError(f"{here.at(('rules', index, 'match'))}: match must be a regular expression, got {match!r}")
    try:
        pattern = regex.compile(match)
    except (regex.error, RecursionError, OverflowError) as e:
        raise RecipeError(f"{here.at(('rules', index, 'match'))}: {match!r} is not a valid regular expression: {e}") from None
    if "op" not in value or value["op"] is None:
        raise RecipeError(f"{where}: rule has no op")
    try:
        op = parse_op(value["op"])
    except ValueError as e:
        raise RecipeError(f"{here.at(('rules', index, 'op'))}: {e}") from None
    optional = value.get("optional", False)
    if not isinstance(optional, bool):
        raise RecipeError(f"{here.at(('rules', index, 'optional'))}: optional must be true or false")

    names = value.get("sources")
    if names is not None:
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise RecipeError(f"{here.at(('rules', index, 'sources'))}: sources must be a list of source names")
        if op.spec.source_param:
            raise RecipeError(f"{here.at(('rules', index, 'sources'))}: {op.spec.usage} chooses its source itself; remove the rule's sources")
        if op.spec.inputs == (0, 0):
            raise RecipeError(f"{here.at(('rules', index, 'sources'))}: {op.spec.name} reads no source; remove the rule's sources")
    # a fault in the inputs is on the rule's `sources:` line when it names them, else on its op's line
    inputs = _inputs(op, names, sources, here.at(("rules", index, "op" if names is None else "sources")))
    try:
        params = check_values(op.spec, op.values, inputs, str(op))
    except ValueError as e:
        raise RecipeError(f"{here.at(('rules', index, 'op'))}: {e}") from None
    dtype = _dtype(value["dtype"], here.at(("rules", index, "dtype"))) if value.get("dtype") is not None else None
    param_where = {name: here.at(_param_path(written, index, op.name, name)) for name in params}
    return Rule(index, match, pattern, op, inputs, optional, where, dtype, params, param_where, budget)


def _param_path(written: Any, index: int, op: str, name: str) -> tuple:
    """Where a rule's parameter is written: the recipe parameter it refers to (`${recipe.alpha}`), else the op."""
    value = _get(written, ("op", op, name))
    m = RECIPE_REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if m:
        return tuple(m[1].split("."))
    return ("rules", index, "op") + ((op, name) if value is not None else ())


def _inputs(op: OpCall, names: list[str] | None, sources: dict[str, SourceSpec], where: str) -> tuple[str, ...]:
    spec = op.spec
    if spec.inputs == (0, 0):
        return ()
    source_param = next((p.name for p in spec.params if p.kind == "source"), None)
    if source_param:
        if op.values.get(source_param) is None:
            raise RecipeError(f"{where}: {spec.name}: missing parameter '{source_param}' (the source to take)")
        names = [op.values[source_param]]
    elif names is None:
        names = list(sources)
    for n in names:
        if n not in sources:
            raise RecipeError(f"{where}: {op}: unknown source {n!r} (sources: {', '.join(sources)})")
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: {op}: a source is named twice in {names}")
    fewest, most = spec.inputs
    if len(names) < fewest or most is not None and len(names) > most:
        wanted = str(fewest) if fewest == most else f"{fewest} or more" if most is None else f"{fewest} to {most}"
        raise RecipeError(
            f"{where}: {op} takes {wanted} sources but gets {len(names)} ({', '.join(names)}); "
            "name them with the rule's `sources: [...]`"
        )
    return tuple(names)


class _Locator:
    """Turns a path inside the recipe into 'recipe NAME (FILE:LINE) path' for messages."""

    def __init__(self, name: str, file: str | None):
        self.name, self.file = name, file
        self._root = _compose(file)

    def at(self, path: tuple) -> str:
        place = self.file or "composed config"
        line = _line(self._root, path)
        if line is not None:
            place += f":{line}"
        text = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        return printable(f"recipe '{self.name}' ({place})" + (f" {text}" if text else ""))


def _compose(file: str | None):
    if not file:
        return None
    try:
        return yaml.compose(read_small(file, MAX_RECIPE_BYTES).decode("utf-8"), Loader=yaml.SafeLoader)
    except (OSError, ValueError, yaml.YAMLError, RecursionError):  # ValueError: not UTF-8
        return None


def _line(node, path: tuple) -> int | None:
    """1-based line of `path` in a composed YAML node tree (a mapping entry's: its key's, where a block value
    such as a schedule's mapping begins on the next line), or None where the file does not hold it."""
    if node is None:
        return None
    line = node.start_mark.line
    for part in path:
        if isinstance(node, yaml.MappingNode):
            key, node = next(((k, v) for k, v in node.value if k.value == str(part)), (None, None))
            line = key.start_mark.line if key is not None else line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            node = None
        if node is None:
            return None
    return line + 1
