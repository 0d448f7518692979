"""Packaging: what an output carries beside its weights, so that it explains and rebuilds itself.

A diffusers folder gets config.json and the index (what diffusers needs to load it), `recipe.yaml` (the
recipe with its sources pinned: it rebuilds the folder), `fluxrecipe.json` (provenance), a model card, the
diagnostics and a manifest of every file's size and sha256. A single file (BFL, ComfyUI) carries the same
in its safetensors metadata: the pinned recipe and the provenance, and the sha256 of its data. The
executor writes the weights; this module writes the rest, and never a time or a host name, so the same
recipe on the same inputs gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from .. import __version__
from ..formats import FORMATS, diffusers, gguf_model
from ..formats.safetensors import encode_header
from ..loras import as_written
from ..plan import Plan
from ..recipe import DTYPES
from ..schedule import plain
from ..writer import MANIFEST_NAME, WRITTEN_BY, rewrite_header, rewrite_start, write_file, write_json
from .card import model_card

PROVENANCE_NAME = "fluxrecipe.json"
RECIPE_NAME = "recipe.yaml"
DIAGNOSTICS_NAME = "diagnostics.json"
CARD_NAME = "README.md"
HEADER_ROOM = 64 << 10  # header bytes a single file keeps free for what only the run knows (counts, hashes)
LISTED = 100  # per-tensor counts a single file's provenance lists before it gives the rest as a total
DIGEST_PLACEHOLDER = "0" * 64  # the data's sha256 has this length


def as_recorded(plan: Plan, output: Path) -> Plan:
    """The plan as the output's files record it: an output is shared, so no absolute local path goes into it.
    A local source is named by its path relative to the output's folder (where its recipe.yaml lies, so that
    recipe.yaml replays from anywhere: see sources.py); hub sources by repo and commit, demo ones by name."""
    folder = os.path.abspath(output.parent if plan.single_file else output)
    sources = []
    for s in plan.sources:
        if "path" in s.origin:
            relative = os.path.relpath(s.origin["path"], folder)
            s = dataclasses.replace(s, spec=relative, origin={**s.origin, "path": relative}, folder=relative)
        sources.append(s)
    loras = []
    for lora in plan.loras:
        if "path" in lora.origin:
            relative = os.path.relpath(lora.origin["path"], folder)
            lora = dataclasses.replace(lora, spec=relative, origin={**lora.origin, "path": relative})
        loras.append(lora)
    recipe = dataclasses.replace(plan.recipe, file=os.path.basename(plan.recipe.file) if plan.recipe.file else None)
    return dataclasses.replace(plan, recipe=recipe, sources=tuple(sources), loras=tuple(loras))


def file_metadata(plan: Plan, result=None) -> dict[str, str]:
    """The metadata in every weight file's header, known before a byte is written. A folder's shards name a
    local source by its name only (recipe.yaml beside them has its path), so that their bytes never depend on
    where the folder lies: a rebuild anywhere gives the same shards. A single file has nothing beside it."""
    recipe = pinned_recipe(plan, result)
    if not plan.single_file:
        recipe["sources"] = {name: {"local": name} if "path" in pin else pin for name, pin in recipe["sources"].items()}
    container = {} if plan.gguf_type else {"format": "pt"}  # safetensors' own marker (a GGUF file's keys are gguf_model's)
    return {**container, WRITTEN_BY: __version__, "fluxrecipe.recipe": json.dumps(recipe, separators=(",", ":"))}


def header_size(plan: Plan) -> int:
    """The header a single file is written with: everything the plan knows of its final metadata (the
    provenance without the run's counts, which are capped at LISTED per list), and room for the rest."""
    if not plan.single_file:
        return 0
    out = plan.files[0]
    metadata = _single_file_metadata(plan, provenance(plan, None, LISTED), DIGEST_PLACEHOLDER)
    if plan.gguf_type:  # the data starts at an aligned offset; the room is a multiple of every alignment
        return gguf_model.encode(out.name, out, _gguf_metadata(plan, metadata)).tensors[0].begin + HEADER_ROOM
    header, _ = encode_header(out.entries(), metadata)
    return len(header) + HEADER_ROOM


def finish(plan: Plan, result, folder: Path) -> None:
    """Everything beside the weights, into the output's (still partial) folder."""
    if plan.single_file:
        _finish_file(plan, result, folder / plan.files[0].name)
        return
    files = result.files
    files["config.json"] = write_json(folder / "config.json", plan.config)
    files[diffusers.INDEX_NAME] = write_json(folder / diffusers.INDEX_NAME, diffusers.index(plan.files))
    files[RECIPE_NAME] = write_file(folder / RECIPE_NAME, yaml.safe_dump(pinned_recipe(plan, result), sort_keys=False, allow_unicode=True).encode())
    files[PROVENANCE_NAME] = write_json(folder / PROVENANCE_NAME, provenance(plan, result))
    files[CARD_NAME] = write_file(folder / CARD_NAME, model_card(plan).encode())
    if result.distances is not None:
        files[DIAGNOSTICS_NAME] = write_json(
            folder / DIAGNOSTICS_NAME,
            {"metric": "relative L2 distance of the merged tensors to each source", "overall": result.distances.overall(), "blocks": result.distances.relative()},
        )
    manifest = {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(files.items())}
    files[MANIFEST_NAME] = write_json(folder / MANIFEST_NAME, {"fluxrecipe": __version__, "files": manifest})


def _finish_file(plan: Plan, result, path: Path) -> None:
    """The single file's header again, now with the provenance and the sha256 of its data."""
    out = plan.files[0]
    metadata = _single_file_metadata(plan, provenance(plan, result, LISTED), result.files[out.name].sha256, result)
    if plan.gguf_type:
        rewrite_start(path, gguf_model.encode(str(path), out, _gguf_metadata(plan, metadata), header_size(plan)).data)
        return
    entries, own, _ = as_written(out, plan.format, plan.factors, plan.lora_rank, result.lora_left_out, result.lora_ranks) if plan.factors else (out.entries(), {}, ())
    rewrite_header(path, entries, {**metadata, **own}, header_size(plan))


def _gguf_metadata(plan: Plan, strings: dict[str, str]):
    return gguf_model.metadata(gguf_model.file_type(plan.gguf_type), strings)


def _single_file_metadata(plan: Plan, record: dict, data_sha256: str, result=None) -> dict[str, str]:
    return {
        **file_metadata(plan, result),
        **dict(plan.files[0].metadata),
        "fluxrecipe.provenance": json.dumps(record, separators=(",", ":")),
        "fluxrecipe.data_sha256": data_sha256,
    }


def pinned_recipe(plan: Plan, result=None) -> dict:
    """The recipe as composed (overrides applied, ${recipe.alpha} kept, so a replay can override it again)
    with every source and LoRA pinned to what was read: a hub commit, a demo name, or a path with the content
    hash of what was read there (given the run's `result`), which a replay must match."""
    recipe = dict(plan.recipe.written)
    hashes = result.source_hashes if result is not None else {}
    if plan.sources:  # a recipe of LoRAs alone has none
        recipe["sources"] = {s.name: _pin(s.origin) | ({"content_hash": hashes[s.name]} if s.name in hashes else {}) for s in plan.sources}
    if plan.loras:
        written = {name: spec if isinstance(spec, dict) else {} for name, spec in (recipe.get("loras") or {}).items()}
        recipe["loras"] = {
            lora.name: _pin(lora.origin) | {k: v for k, v in written.get(lora.name, {}).items() if k in ("strength", "ignore_unmatched")}
            for lora in plan.loras
        }
    return recipe


def _pin(origin: dict[str, str]) -> dict[str, str]:
    if "repo" in origin:
        return {"repo": origin["repo"], "revision": origin["commit"]} | {k: origin[k] for k in ("subfolder", "file") if k in origin}
    return {k: v for k, v in origin.items() if k in ("path", "subfolder", "demo", "content_hash")}


def provenance(plan: Plan, result, listed: int | None = None) -> dict:
    """What was merged from what, by which recipe: enough to explain and rebuild the output. No times, no
    hosts. `result` None: what the plan knows alone. `listed`: at most this many entries per list (a single
    file's header has a size)."""
    result = result or _NO_RUN
    sources = {s.name: {"spec": s.spec, **s.origin} for s in plan.sources}
    for name, digest in result.source_hashes.items():
        sources[name]["content_hash"] = digest
    for s in plan.sources:
        if not FORMATS[s.layout].canonical:
            sources[s.name]["layout"] = s.layout
    inputs = {k: v for k, v in result.nonfinite.items() if not k.startswith("output: ")}
    outputs = {k.removeprefix("output: "): v for k, v in result.nonfinite.items() if k.startswith("output: ")}
    return {
        "fluxrecipe": __version__,
        "recipe": plan.recipe.name,
        "recipe_file": plan.recipe.file,
        "sources": sources,
        "base": plan.recipe.base,
        "format": plan.format,
        "rules": [_rule(r) for r in plan.recipe.rules],
        "dtype": DTYPES[plan.recipe.dtype][0],
        **({"gguf_type": plan.gguf_type} if plan.gguf_type else {}),
        "tensors": len(plan.steps),
        "dropped": _listed([{"key": d.key, "reason": d.reason} for d in plan.dropped], listed),
        "notes": list(plan.notes),
        "nonfinite_inputs": _counts(inputs, listed),
        "nonfinite_outputs": _counts(outputs, listed),
        "clamped": _counts(result.clamped, listed),
        **({"loras": [_lora(s, listed) for s in plan.loras]} if plan.loras else {}),
        **({"lora": _lora_output(plan, result, listed)} if plan.factors else {}),
        **({"lora": _lora_space_output(plan, result, listed)} if plan.lora_space else {}),
    }


def _lora(summary, listed: int | None) -> dict:
    """A baked-in LoRA: what was read and what it changed."""
    return {
        "name": summary.name, "spec": summary.spec, **summary.origin, "format": summary.format, "strength": plain(summary.strength),
        "ranks": sorted(set(summary.ranks)), "tensors": summary.tensors, "blocks": list(summary.blocks),
        "unmatched": _listed([{"key": k, "why": why} for k, why in summary.unmatched], listed), "ignored_text_encoder_keys": summary.ignored,
    }


def _lora_output(plan: Plan, result, listed: int | None) -> dict:
    """A merge written as a LoRA: its rank, and per matrix written its rank and the relative error of its
    factors (||difference - up @ down|| / ||difference||); the matrices left out (their difference is exactly
    0); per 1-D tensor it cannot hold, the largest |difference|."""
    left_out = set(result.lora_left_out)
    return {
        "rank": plan.lora_rank,
        **({"energy": plan.lora_energy} if plan.lora_energy is not None else {}),
        "base": plan.recipe.base,
        "matrices": {
            f.module: {"rank": result.lora_ranks.get(f.module, f.rank), "svd": "exact" if f.exact else "randomized", "relative_error": result.lora_errors.get(f.module)}
            for f in plan.factors if f.rank and f.module not in left_out
        },
        "left_out": {"count": len(left_out), "modules": _listed(list(result.lora_left_out), listed)},
        "not_held": {f.module: result.lora_unheld.get(f.module) for f in plan.factors if not f.rank},
    }


def _lora_space_output(plan: Plan, result, listed: int | None) -> dict:
    """A LoRA made of LoRAs: how (convert, merge, truncate), the rank and energy asked for, and per module its
    rank, the LoRA modules it is made of and its relative error ||sum - up @ down|| / ||sum||."""
    space = plan.lora_space
    modules = [
        {"module": m.name, "rank": m.rank, "from": [f"{c.lora}: {', '.join(c.modules)}" for c in m.contributions], "relative_error": result.lora_errors.get(m.name)}
        for m in space.modules
    ]
    return {"how": space.how, "rank": space.rank, "energy": space.energy, "modules": _listed(modules, listed)}


def _rule(rule) -> dict:
    """A rule as applied: its op with every parameter, defaults filled in (DARE's seed among them), so that a
    replay does not depend on this version's defaults; schedules as written."""
    params = {name: plain(value) for name, value in rule.params.items()}
    return {"match": rule.match, "op": str(rule.op), "params": params, "sources": list(rule.sources)} | ({"dtype": rule.dtype} if rule.dtype else {})


@dataclasses.dataclass(frozen=True)
class _NoRun:
    """What provenance reads of a run, before there is one."""

    source_hashes: dict = dataclasses.field(default_factory=dict)
    nonfinite: dict = dataclasses.field(default_factory=dict)
    clamped: dict = dataclasses.field(default_factory=dict)
    lora_errors: dict = dataclasses.field(default_factory=dict)
    lora_unheld: dict = dataclasses.field(default_factory=dict)
    lora_left_out: list = dataclasses.field(default_factory=list)
    lora_ranks: dict = dataclasses.field(default_factory=dict)


_NO_RUN = _NoRun()


def _listed(items: list, listed: int | None) -> list:
    return items if listed is None or len(items) <= listed else [*items[:listed], {"and more": len(items) - listed}]


def _counts(values: dict, listed: int | None) -> dict:
    if listed is None or len(values) <= listed:
        return values
    kept = dict(list(values.items())[:listed])
    kept["(and more)"] = len(values) - listed
    return kept
