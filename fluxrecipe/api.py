"""fluxrecipe without Hydra: recipe -> plan -> merge into a folder or a file, from Python.

    from fluxrecipe import api

    recipe = api.load_recipe("recipes/krea_schnell.yaml", alpha=0.3, sources={"schnell": "/data/schnell", "krea": "/data/krea"})
    plan = api.plan(recipe, "merged/krea30")          # every check; no tensor read
    print(api.describe(plan))                         # what `dry_run=true` prints
    result = api.write(plan, "merged/krea30")         # the merge; result.files, result.seconds, ...
    api.merge("recipes/to_comfyui_fp8.yaml", "flux-fp8.safetensors", sources={"model": "/data/flux1-dev.safetensors"})  # both at once

The command line (`python -m fluxrecipe`) is a thin layer over these functions: fluxrecipe.cli turns Hydra's
config into their arguments.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from . import package
from .errors import RecipeError, SourceError, UsageError
from . import formats
from .loras import open_lora
from .options import Options, refuse_unused
from .plan import Plan, format_plan, make_plan
from .recipe import FORMATS, Recipe, load_recipe as _load_data, read_recipe_file
from .sources import open_source
from .writer import atomic_output, check_target

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def load_recipe(recipe: str | Path | dict, name: str | None = None, sources: dict[str, Any] | None = None, **params: Any) -> Recipe:
    """A recipe from a YAML file or a mapping, with parameters (`alpha=0.3`) and sources overridden."""
    file = None
    if isinstance(recipe, dict):
        data = recipe
    else:
        file = Path(recipe).expanduser()
        data = read_recipe_file(file)  # bounded: size, alias expansion, only a regular file
    if not isinstance(data, dict):
        raise RecipeError(f"{file or 'recipe'}: a recipe is a mapping of fields")
    data = {**data, **params}
    if sources:
        data["sources"] = {**(data.get("sources") or {}), **sources}
    return _load_data(data, name or (file.stem if file else "recipe"), str(file.resolve()) if file else None)


def plan(
    recipe: Recipe, output: str | Path | None = None, format: str | None = None, shard_size: int | str = "10GB", lora_rank: int | None = None, download: bool = True,
    lora_energy: float | None = None, gguf_type: str | None = None,
) -> Plan:
    """Every check a merge makes before reading a tensor: sources and LoRAs opened (headers only), rules
    decided, shapes and the output's architecture checked, the output's files laid out. `lora_rank`: the
    rank of a merge written as a LoRA (format=lora, lora_peft, lora_comfyui; default 16), or for a recipe of
    LoRAs alone the rank they are cut to (default: exact); `lora_energy`: the fraction of each matrix's
    squared norm that decides its rank, at most `lora_rank`. `download=False` plans hub sources
    from headers read on the hub, downloading no weights (a plan to look at, not to write: a dry run).
    `gguf_type`: the whole file's type of format=gguf (Q8_0 by default; a rule's dtype sets its own)."""
    output_format = format or recipe.format or "diffusers"
    if output_format not in FORMATS:
        raise UsageError(f"format={output_format}: choose one of {', '.join(FORMATS)}")
    if gguf_type is not None and output_format != "gguf":
        raise UsageError(f"gguf_type={gguf_type} changes nothing: format={output_format} writes no GGUF file; gguf_type is the type of format=gguf")
    suffix = formats.FORMATS[output_format].suffix
    file_name = Path(output).name if output is not None and formats.FORMATS[output_format].single_file else f"{recipe.name}{suffix}"
    loras = {name: open_lora(spec) for name, spec in recipe.loras.items()}
    if not recipe.sources:
        from .lora_space import plan_lora_space

        return plan_lora_space(recipe, loras, output_format, file_name, lora_rank, lora_energy)
    checkpoints = {name: open_source(spec, download) for name, spec in recipe.sources.items()}
    return make_plan(recipe, checkpoints, parse_size(shard_size), output_format, file_name, loras, lora_rank or 16, gguf_type, lora_energy)


def describe(plan: Plan) -> str:
    return format_plan(plan)


def output_path(output: str | Path, output_format: str) -> Path:
    """The output as an absolute path, checked against the format: a file for a single-file format (named
    .safetensors), a folder otherwise."""
    target = Path(os.path.abspath(os.path.expanduser(str(output))))
    suffix = formats.FORMATS[output_format].suffix
    if formats.FORMATS[output_format].single_file and target.suffix != suffix:
        raise UsageError(f"output={output}: format={output_format} writes one file: name it, as output=merged/model{suffix}")
    if not formats.FORMATS[output_format].single_file and target.suffix in (".safetensors", ".gguf"):
        raise UsageError(f"output={output}: format={output_format} writes a folder; for one .safetensors file choose format=bfl, comfyui, lora or lora_peft, for a .gguf file format=gguf")
    return target


def check_output(plan: Plan, output: str | Path, overwrite: bool = False, dry_run: bool = False) -> Path:
    """Where the merge would go, checked: its name against the format, apart from every source, and (unless
    a dry run asks) not an existing output unless `overwrite` (and then only a model fluxrecipe recognises)."""
    target = output_path(output, plan.format)
    if not dry_run:
        check_target(target, overwrite, single_file=plan.single_file)
    inputs = [(f"source '{s.name}'", s.location) for s in plan.sources] + [(f"lora '{lora.name}'", lora.location) for lora in plan.loras]
    for what, location in inputs:
        src, out = Path(location).resolve(), target.resolve()
        if out == src or src in out.parents or out in src.parents:
            raise UsageError(f"output {output} and {what} ({location}) overlap: write the merge somewhere else")
    return target


def write(plan: Plan, output: str | Path, options: Options | None = None):
    """Execute the plan into `output`, atomically; returns the executor's Result (with `.output`)."""
    result, _ = _run(plan, output, options, in_memory=False)
    result.bytes_written = sum(r.size for r in result.files.values())
    return result


def merge_in_memory(plan: Plan, output: str | Path, options: Options | None = None) -> tuple[Any, dict[str, Any]]:
    """Execute the plan into memory: returns the Result and the merged transformer's tensors by diffusers
    parameter name, in the output's dtype, equal to what `write` puts into the shards (the same plan, the same
    arithmetic, one rounding). No weight file is written: `output` gets the rest of a written merge (config,
    recipe.yaml, provenance, card, diagnostics, and a manifest with each shard's sha256 as it would be), so
    that its recipe.yaml writes the weights later, byte for byte as the manifest says."""
    if plan.single_file:
        raise UsageError(f"format={plan.format} is one file: a merge in memory keeps the other files of a diffusers folder (format=diffusers)")
    result, tensors = _run(plan, output, options, in_memory=True)
    result.bytes_written = sum(r.size for name, r in result.files.items() if (result.output / name).exists())
    return result, tensors


def _run(plan: Plan, output: str | Path, options: Options | None, in_memory: bool) -> tuple[Any, dict[str, Any] | None]:
    """The merge into `output` (its weights in memory instead of its shards, when asked), atomically."""
    from .execute import InMemory, check_device, execute  # torch: only a run that merges pays for importing it

    options = options or Options(progress=False)
    unread = [s.name for s in plan.sources if not s.downloaded]
    if unread:
        raise UsageError(f"the plan was made without downloading source(s) {', '.join(unread)} (download=False, for a dry run): plan again to write it")
    target = check_output(plan, output, options.overwrite)
    check_device(options.device)
    local = [s.name for s in plan.sources if "path" in s.origin]
    if plan.lora_space:
        from . import lora_space

        plan = lora_space.settle(plan, options)
    recorded = package.as_recorded(plan, target)
    metadata, header_size = package.file_metadata(recorded), package.header_size(recorded)
    held: list[InMemory] = []

    def in_memory_sink(result) -> InMemory:
        held.append(InMemory(plan, metadata, header_size, result))
        return held[0]

    with atomic_output(target, options.overwrite, plan.files[0].name if plan.single_file else None) as folder:
        if plan.lora_space:
            result = lora_space.write(plan, folder, metadata, header_size, options)
        else:
            result = execute(plan, folder, options, metadata, header_size, hash_sources=local, sink=in_memory_sink if in_memory else None)
        _check_replay(plan, result)
        package.finish(recorded, result, folder)
        if in_memory:  # the index would name shards that are not there; the manifest lists both
            (folder / formats.diffusers.INDEX_NAME).unlink()
    result.output = target
    return result, held[0].tensors if held else None


def _check_replay(plan: Plan, result) -> None:
    """A recipe pinned by an earlier merge names the content hash of each local source it read: a replay that
    read other bytes there is not that merge, and its output is not kept."""
    for name, pinned in plan.recipe.content_hashes.items():
        read = result.source_hashes.get(name)
        if read and read != pinned:
            where = next(s.location for s in plan.sources if s.name == name)
            raise SourceError(
                f"source '{name}' ({where}) is not what this recipe was made from: its content hash is {read}, the recipe "
                f"says {pinned}; nothing was written (remove content_hash from the recipe to merge these files anyway)"
            )


def merge(
    recipe: Recipe | str | Path | dict, output: str | Path, format: str | None = None, shard_size: int | str = "10GB", dtype: str | None = None,
    lora_rank: int | None = None, sources: dict[str, Any] | None = None, params: dict[str, Any] | None = None, lora_energy: float | None = None,
    gguf_type: str | None = None, **options: Any,
):
    """Load (when given a file or mapping, with `sources`, `params` and `dtype` overriding its own), plan and
    write in one call; `options` are Options' fields (threads=4, in_flight="128MB", ...)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, sources=sources, **(params or {}), **({"dtype": dtype} if dtype else {}))
    elif dtype or sources or params:
        raise UsageError("dtype, sources and params change a recipe as it is loaded: pass the recipe's file or mapping, or use api.load_recipe(...)")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(Options)})
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)} (options: {', '.join(f.name for f in dataclasses.fields(Options))})")
    if isinstance(options.get("in_flight"), str):
        options["in_flight"] = parse_size(options["in_flight"])
    planned = plan(recipe, output, format, shard_size, lora_rank, lora_energy=lora_energy, gguf_type=gguf_type)
    # what the caller asks of the run: a value other than the default (Python callers pass defaults as they
    # are), and diagnostics=True where there may be none (turning them off is fine for any output)
    defaults = {f.name: f.default for f in dataclasses.fields(Options)}
    asked = {k: v for k, v in options.items() if (v is True if k == "diagnostics" else v != defaults[k])}
    refuse_unused(asked, not recipe.sources, planned.single_file, planned.format)
    return write(planned, output, Options(**{"progress": False, **options}))


def parse_size(text: object) -> int:
    """'10GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", str(text).strip(), re.IGNORECASE)
    if not m:
        raise UsageError(f"{text}: give a size such as 10GB, 500MB or 2GiB")
    size = int(float(m[1]) * SIZE_UNITS[(m[2] or "B").upper()])
    if size <= 0:
        raise UsageError(f"{text}: must be above 0")
    return size
