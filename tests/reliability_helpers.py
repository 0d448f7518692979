"""Helpers of the reliability tests: broken copies of models, header surgery, and 'nothing was left' checks.

The header surgery works on the bytes, independently of fluxrecipe's parser: 8 bytes of little-endian
length, the JSON header, the data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from conftest import write_recipe

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def split(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header document, data bytes)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header: bytes | dict, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def edit_header(path: Path, edit: Callable[[dict], None]) -> None:
    doc, data = split(path)
    edit(doc)
    join(path, doc, data)


def tensors_by_offset(path: Path) -> list[str]:
    """The tensor names of a file, in the order of their data."""
    doc, _ = split(path)
    doc.pop("__metadata__", None)
    return sorted(doc, key=lambda k: doc[k]["data_offsets"][0])


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def leftovers(output: Path) -> list[str]:
    """What stands under the output's name or its temporary names (partial folder, lock, previous)."""
    if not output.parent.exists():
        return []
    return sorted(p.name for p in output.parent.iterdir() if p.name == output.name or p.name.startswith(f".{output.name}."))


def assert_no_output(output: Path) -> None:
    assert leftovers(output) == [], f"a failed run left {leftovers(output)} beside {output}"


def digests(folder: Path) -> dict[str, str]:
    """File name -> sha256 of every file in `folder` (recursively)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def use_recipe(monkeypatch, folder: Path, name: str, text: str) -> str:
    """Write recipe `name` into `folder` and make it the only user recipe folder; returns `recipe=name`."""
    write_recipe(folder, name, text)
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(folder))
    return f"recipe={name}"


def pair_recipe(a: Path, b: Path, *, base: str = "a", rules: str = "[{match: '.*', op: 'lerp:0.5'}]", extra: str = "") -> str:
    """A two-source recipe text: sources a and b (paths), lerp of both unless told otherwise."""
    return f"sources: {{a: '{a}', b: '{b}'}}\nbase: {base}\nrules: {rules}\n{extra}"
