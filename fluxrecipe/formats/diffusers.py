"""diffusers' layout: a folder of config.json, safetensors shards and an index, keys as canonical keys.

Reading: every key is found through the folder's index (or the headers of its files), never through a
shard's position, so two sources never need to share a shard layout. Writing: the output's tensors in
shards of at most `shard_size` bytes, the index that maps each key to its shard, and config.json.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from ..errors import SourceError
from ..files import os_error_text, read_small
from ..text import cut
from .layout import OutFile, OutTensor, Piece, TensorRef, whole
from .safetensors import TensorEntry

INDEX_SUFFIX = ".safetensors.index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SHARD_NAME = "diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def to_canonical(source: str, entries: dict[str, TensorEntry]) -> dict[str, TensorRef]:
    return {
        key: TensorRef(source, key, key, e.dtype, e.shape, (Piece(e.file, e.begin, e.nbytes),) if e.nbytes else ())
        for key, e in entries.items()
    }


def weight_files(name: str, folder: Path, remote: Collection[Path] = ()) -> dict[Path, list[str] | None]:
    """The folder's weight files -> the keys its index assigns them (None: all the file holds). `remote`:
    weight files of a hub folder known by their headers only (a dry run: hub.fetch with download=False)."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))  # one that is not a regular file is refused when read
    if len(indexes) > 1:
        preferred = folder / INDEX_NAME
        if preferred not in indexes:
            raise SourceError(f"source '{name}': {folder} holds several indexes ({', '.join(p.name for p in indexes)}): name one with a path")
        indexes = [preferred]
    if indexes:
        return _files_of_index(name, folder, indexes[0], remote)
    if (folder / WEIGHTS_NAME).is_file() or folder / WEIGHTS_NAME in remote:
        return {folder / WEIGHTS_NAME: None}
    files = sorted({p for p in folder.glob("*.safetensors") if p.is_file()} | {p for p in remote if p.parent == folder})
    if not files:
        raise SourceError(f"source '{name}': {folder} holds no .safetensors files")
    return {p: None for p in files}


def _files_of_index(name: str, folder: Path, index: Path, remote: Collection[Path]) -> dict[Path, list[str]]:
    try:
        weight_map = json.loads(read_small(index))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except OSError as e:  # not a regular file (a FIFO would block), too large, unreadable
        raise SourceError(f"source '{name}': {os_error_text(e)}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SourceError(f"source '{name}': {index} is not a valid safetensors index ({e})") from None
    files: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        if not key.isprintable():
            raise SourceError(f"source '{name}': {index} names key {cut(key)!r}, which holds unprintable characters")
        if not isinstance(shard, str) or shard in ("", ".", "..") or "/" in shard or "\\" in shard or not shard.isprintable():
            raise SourceError(f"source '{name}': {index} names shard {cut(shard)!r} for key '{cut(key)}': a shard must be a file name in the index's own folder")
        path = folder / shard
        if not path.is_file() and path not in remote:
            raise SourceError(f"source '{name}': {index} names shard '{cut(shard)}' for key '{cut(key)}', but {path} does not exist")
        files.setdefault(path, []).append(key)
    return files


def out_files(tensors: list[OutTensor], shard_size: int, metadata: tuple[tuple[str, str], ...]) -> tuple[OutFile, ...]:
    """The tensors in shards of at most `shard_size` bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return tuple(OutFile(SHARD_NAME.format(index=i + 1, count=len(groups)), tuple(g), metadata=metadata) for i, g in enumerate(groups))


def out_tensors(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> list[OutTensor]:
    return [OutTensor(key, dtypes[key], shape, whole(key, shape)) for key, shape in shapes.items()]


def index(files: tuple[OutFile, ...]) -> dict:
    """The safetensors index diffusers and transformers read: total size and key -> shard file."""
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    return {"metadata": {"total_size": sum(f.nbytes for f in files)}, "weight_map": dict(sorted(weight_map.items()))}
