"""A source spec -> a Checkpoint: every key of the model and where its bytes lie.

A source is a local folder (config.json + *.safetensors, with or without an index), a pipeline folder with a
`transformer/` sub-folder, a single .safetensors file, a hub repo id, or a generated demo checkpoint. Keys
are found through the index, never through a shard's position, so two sources never need to share a shard
layout. Only headers are read here; no tensor data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError
from .files import os_error_text, read_small
from .recipe import SourceSpec
from .st_format import read_header

INDEX_SUFFIX = ".safetensors.index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
BFL_PREFIXES = ("double_blocks.", "single_blocks.", "model.diffusion_model.")


@dataclass(frozen=True)
class TensorLoc:
    """Where one source tensor's bytes lie."""

    source: str
    key: str
    file: str
    begin: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    name: str
    folder: str
    tensors: dict[str, TensorLoc]  # in file order, then byte order
    config: dict[str, Any] | None
    origin: dict[str, str] = field(default_factory=dict)  # provenance: how to get these exact files again

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_source(spec: SourceSpec) -> Checkpoint:
    """Locate (fetching from the hub where needed) and index one source."""
    kind, value, revision = _classify(spec)
    if kind == "demo":
        from .demo import demo_checkpoint

        location, origin = demo_checkpoint(value), {"demo": value}
        try:
            return _index(spec.name, location, origin)
        except SourceError as e:
            raise SourceError(f"{e} (the demo checkpoint in the cache is damaged: delete {location} and run again to generate it anew)") from None
    elif kind == "repo":
        from .hub import fetch

        try:
            location, origin = fetch(spec.name, value, revision, spec.subfolder)
        except SourceError as e:
            if spec.text and os.path.isdir(os.path.expanduser(spec.text.split("/")[0])):  # a local path, mistyped?
                raise SourceError(f"{e} (and there is no local path '{spec.text}' either)") from None
            raise
    else:
        location = _local_folder(spec.name, Path(value).expanduser(), spec.subfolder)
        origin = {"path": str(Path(value).expanduser().resolve())} | ({"subfolder": spec.subfolder} if spec.subfolder else {})
    return _index(spec.name, location, origin)


def _classify(spec: SourceSpec) -> tuple[str, str, str | None]:
    if spec.demo:
        return "demo", spec.demo, None
    if spec.repo:
        return "repo", spec.repo, spec.revision
    if spec.path:
        return "path", _beside_recipe(spec.path, spec), None
    text = spec.text.strip()
    if os.path.exists(os.path.expanduser(_beside_recipe(text, spec))):
        return "path", _beside_recipe(text, spec), None
    looks_local = text.startswith(("/", ".", "~")) or text.endswith(".safetensors")
    m = REPO_ID.fullmatch(text)
    if m and not looks_local:
        return "repo", m["repo"], m["revision"]
    if looks_local or "/" in text:
        raise SourceError(f"source '{spec.name}': {text}: no such file or folder")
    raise SourceError(f"source '{spec.name}': {text!r} is neither an existing path nor a hub repo id (org/name[@revision])")


def _beside_recipe(path: str, spec: SourceSpec) -> str:
    """A relative path that is not there from the current folder but is from the recipe file's folder: an
    output's recipe.yaml names its local sources relative to itself, so that it replays from anywhere."""
    if os.path.isabs(os.path.expanduser(path)) or os.path.exists(path) or not spec.recipe_dir:
        return path
    beside = os.path.join(spec.recipe_dir, path)
    return beside if os.path.exists(beside) else path


def _local_folder(name: str, path: Path, subfolder: str | None) -> Path:
    if subfolder:
        path = path / subfolder
    if not path.exists():
        raise SourceError(f"source '{name}': {path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SourceError(f"source '{name}': {path} is not a .safetensors file")
        return path
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"  # a pipeline folder (the hub's FLUX.1 repos also hold a single-file copy beside it)
    return path


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _index(name: str, location: Path, origin: dict[str, str]) -> Checkpoint:
    """Map every key to its file through the index (or the headers of the files), check that they agree."""
    folder = location.parent if location.is_file() else location
    if location.is_file():
        files = {location: None}
    else:
        files = _files_of_folder(name, location)
    tensors: dict[str, TensorLoc] = {}
    for path, wanted in files.items():
        header = read_header(str(path))
        keys = header.entries if wanted is None else wanted
        for key in keys:
            entry = header.entries.get(key)
            if entry is None:
                raise SourceError(f"source '{name}': the index says '{key}' is in {path}, which does not hold it")
            if key in tensors:
                raise SourceError(f"source '{name}': key '{key}' is in both {tensors[key].file} and {path}")
            tensors[key] = TensorLoc(name, key, str(path), entry.begin, entry.nbytes, entry.dtype, entry.shape)
    if not tensors:
        raise SourceError(f"source '{name}': {location} holds no tensors")
    bfl = next((k for k in tensors if k.startswith(BFL_PREFIXES)), None)
    if bfl:
        raise SourceError(
            f"source '{name}': {location} is in Black Forest Labs' single-file layout (key '{bfl}'), as ComfyUI uses; "
            "fluxrecipe merges the diffusers layout: point the source at a diffusers folder or the hub repo "
            "(its transformer/ folder), or convert the file once with diffusers' FluxTransformer2DModel.from_single_file(...).save_pretrained(...)"
        )
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].file, kv[1].begin)))
    return Checkpoint(name=name, folder=str(folder), tensors=ordered, config=_config(name, folder), origin=origin)


def _files_of_folder(name: str, folder: Path) -> dict[Path, list[str] | None]:
    """Weight files -> the keys the index assigns them (None: all the file holds)."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) > 1:
        preferred = folder / (DIFFUSERS_WEIGHTS + ".index.json")
        if preferred not in indexes:
            raise SourceError(f"source '{name}': {folder} holds several indexes ({', '.join(p.name for p in indexes)}): name one with a path")
        indexes = [preferred]
    if indexes:
        return _files_of_index(name, folder, indexes[0])
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return {folder / DIFFUSERS_WEIGHTS: None}
    files = _weight_files(folder)
    if not files:
        raise SourceError(f"source '{name}': {folder} holds no .safetensors files")
    return {p: None for p in files}


def _files_of_index(name: str, folder: Path, index: Path) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(read_small(index))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except OSError as e:
        raise SourceError(f"source '{name}': {os_error_text(e)}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SourceError(f"source '{name}': {index} is not a valid safetensors index ({e})") from None
    files: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if not key.isprintable():
            raise SourceError(f"source '{name}': {index} names key {key!r}, which holds unprintable characters")
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard or not shard.isprintable():
            raise SourceError(f"source '{name}': {index} names shard {shard!r} for key '{key}': a shard must be a file name in the index's own folder")
        path = folder / shard
        if not path.is_file():
            raise SourceError(f"source '{name}': {index} names shard '{shard}' for key '{key}', but {path} does not exist")
        files.setdefault(path, []).append(key)
    return files


def _config(name: str, folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.exists() and not path.is_symlink():
        return None
    try:
        config = json.loads(read_small(path))
    except OSError as e:
        raise SourceError(f"source '{name}': {os_error_text(e)}") from None
    except (ValueError, RecursionError) as e:
        raise SourceError(f"source '{name}': {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise SourceError(f"source '{name}': {path} is not a JSON object")
    return config
