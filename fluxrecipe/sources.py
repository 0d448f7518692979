"""A source spec -> a Checkpoint: every canonical tensor of the model and where its bytes lie.

A source is a local folder (config.json + *.safetensors, with or without an index), a pipeline folder with a
`transformer/` sub-folder, a single .safetensors file (diffusers, Black Forest Labs or ComfyUI layout, an
all-in-one ComfyUI checkpoint included), a single .gguf file (ComfyUI-GGUF's), a hub repo id, or a generated
demo checkpoint. The layout is
recognised from the keys (formats/), never from a file's name. Only headers (and ComfyUI's few bytes of
quantization markers) are read here; no tensor data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import xxhash

from . import families
from .errors import SourceError
from .families import Family, ShapeError
from .files import open_regular, os_error_text, read_small
from .formats import FORMATS, Recognised, diffusers, gguf_model, recognise
from .formats.layout import TensorRef
from .formats.safetensors import Header, TensorEntry, read_header
from .recipe import SourceSpec
from .text import cut

REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass
class Checkpoint:
    name: str
    folder: str
    tensors: dict[str, TensorRef]  # canonical key -> where its bytes are, in file order
    config: dict[str, Any] | None  # config.json, or derived from the shapes (see config_derived)
    origin: dict[str, str] = field(default_factory=dict)  # provenance: how to get these exact files again
    layout: str = "diffusers"
    config_derived: bool = False
    ignored: dict[str, int] = field(default_factory=dict)  # what the files hold besides the transformer
    notes: tuple[str, ...] = ()
    scaled: int = 0  # tensors stored as scaled fp8
    location: str = ""  # what was read: the folder, or the single file
    downloaded: bool = True  # False: some weight files are known by their headers on the hub only
    family: Family | None = None  # None: recognised from the canonical keys

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = families.recognise(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}

    def describe(self) -> str:
        """Its family and variant: 'FLUX.1 schnell', 'FLUX.2 klein 4B'."""
        return self.family.describe(self.shapes) if self.family else "an unknown model"


def open_source(spec: SourceSpec, download: bool = True) -> Checkpoint:
    """Locate (fetching from the hub where needed) and index one source. `download=False` plans a hub source
    from its weight files' headers, read on the hub (hub.fetch), without downloading them."""
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
            location, origin, remote = fetch(spec.name, value, revision, spec.subfolder, download)
        except SourceError as e:
            if spec.text and os.path.isdir(os.path.expanduser(spec.text.split("/")[0])):  # a local path, mistyped?
                raise SourceError(f"{e} (and there is no local path '{spec.text}' either)") from None
            raise
        return _index(spec.name, location, origin, remote)
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
    looks_local = text.startswith(("/", ".", "~")) or text.endswith((".safetensors", ".gguf"))
    m = REPO_ID.fullmatch(text)
    if m and not looks_local:
        return "repo", m["repo"], m["revision"]
    if looks_local or "/" in text:
        raise SourceError(f"source '{spec.name}': {text}: no such file or folder")
    raise SourceError(f"source '{spec.name}': {text!r} is neither an existing path nor a hub repo id (org/name[@revision])")


def _beside_recipe(path: str, spec: SourceSpec) -> str:
    return local_path(path, spec.recipe_dir)


def file_hash(path: Path) -> str:
    """The content hash of a whole (small) file, as provenance records what was read: 'xxh3-128:HEX'. The
    pages read are let go as it goes: two rank-64 LoRAs would otherwise hold 1.2 GB of page cache."""
    digest = xxhash.xxh3_128()
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            done = 0
            while block := f.read(16 << 20):
                digest.update(block)
                os.posix_fadvise(f.fileno(), done, len(block), os.POSIX_FADV_DONTNEED)
                done += len(block)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    return "xxh3-128:" + digest.hexdigest()


def local_path(path: str, recipe_dir: str | None) -> str:
    """A path a recipe gives: a relative one is found beside the recipe file first, then from the current
    folder. An output's recipe.yaml names its local sources relative to itself, so that it replays from
    anywhere, and never reads another model that happens to lie at that relative path from where it runs."""
    if os.path.isabs(os.path.expanduser(path)) or not recipe_dir:
        return path
    beside = os.path.join(recipe_dir, path)
    return beside if os.path.exists(beside) else path


def _local_folder(name: str, path: Path, subfolder: str | None) -> Path:
    if subfolder:
        path = path / subfolder
    if not path.exists():
        raise SourceError(f"source '{name}': {path}: no such file or folder")
    if path.is_file():
        if path.suffix not in (".safetensors", ".gguf"):
            raise SourceError(f"source '{name}': {path} is not a .safetensors or .gguf file")
        return path
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        return path / "transformer"  # a pipeline folder (the hub's FLUX.1 repos also hold a single-file copy beside it)
    return path


def _index(name: str, location: Path, origin: dict[str, str], remote: dict[Path, Header] | None = None) -> Checkpoint:
    """Read every header (`remote`: those of files left on the hub), recognise the layout from the keys, and
    find (or derive) the config."""
    remote = remote or {}
    folder = location.parent if location.is_file() else location
    files = {location: None} if location.is_file() else diffusers.weight_files(name, location, remote)
    entries: dict[str, TensorEntry] = {}
    file_metadata: dict[str, str] = {}
    for path, wanted in files.items():
        header = remote.get(path) or (gguf_model.source_header if path.suffix == ".gguf" or gguf_model.is_gguf(str(path)) else read_header)(str(path))
        file_metadata.update(header.metadata)
        for key in header.entries if wanted is None else wanted:
            entry = header.entries.get(key)
            if entry is None:
                raise SourceError(f"source '{name}': the index says '{cut(key)}' is in {path}, which does not hold it")
            if key in entries:
                raise SourceError(f"source '{name}': key '{cut(key)}' is in both {entries[key].file} and {path}")
            entries[key] = entry
    if not entries:
        raise SourceError(f"source '{name}': {location} holds no tensors")
    found = recognise(name, str(location), entries, file_metadata)
    ordered = dict(sorted(found.tensors.items(), key=lambda kv: (kv[1].file, kv[1].pieces[0].begin if kv[1].pieces else 0)))
    config = _config(name, folder) if FORMATS[found.layout].config_file else None
    said = families.by_class(config.get("_class_name")) if config else None
    if said and said is not found.family:
        raise SourceError(f"source '{name}': {folder / 'config.json'} says {said.class_name} ({said.name}), but its tensors are {found.family.name}'s: the config belongs to another model")
    derived = config is None and (location.is_file() or not FORMATS[found.layout].config_file)  # a folder needs its config.json
    notes = tuple(found.notes)
    if derived:
        config, derived_notes = _derived_config(name, location, found)
        notes += derived_notes
    return Checkpoint(
        name=name, folder=str(folder), tensors=ordered, config=config, origin=origin, layout=found.layout,
        config_derived=derived, ignored=found.ignored, notes=notes, scaled=found.scaled, location=str(location),
        downloaded=not remote, family=found.family,
    )


def _derived_config(name: str, location: Path, found: Recognised) -> tuple[dict[str, Any], tuple[str, ...]]:
    try:
        config, notes = found.family.derive_config({k: t.shape for k, t in found.tensors.items()}, metadata.version("diffusers"))
    except ShapeError as e:
        raise SourceError(f"source '{name}': {location} {e}: is it a whole {found.family.name} transformer?") from None
    return config, tuple(notes)


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
