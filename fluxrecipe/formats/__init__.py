"""Checkpoint formats: which layout a source's files are in (from their keys, never their names), and the
layouts an output can be written in, all in one table (FORMATS): per format, how a source in it is
recognised and read (canonical tensor refs), and how an output in it is laid out (its files).

Each layout is one module: diffusers.py (canonical keys, folders with an index), bfl.py (Black Forest Labs'
single file, and ComfyUI's, which is BFL behind `model.diffusion_model.`, possibly in scaled fp8), lora.py
(LoRA files in every trainer's keys, read as changes of canonical tensors; a merge written as a LoRA), gguf.py
and gguf_model.py (a BFL file in a GGUF container, quantized; gguf.py's reader gives GGUFEntry tensors). Which
model family a file holds, and what its keys mean in each layout, the families say (families/).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .. import families
from ..errors import SourceError
from ..families import Family, ShapeError
from ..text import cut, some_keys
from . import bfl, diffusers
from .layout import OutFile, TensorRef
from .gguf import BLOCK_TYPES, GGUFEntry
from .safetensors import FLOAT_ITEMSIZE, TensorEntry

LORA_KEY = re.compile(r"(lora_down|lora_up|lora_A|lora_B|lora\.(down|up)|_lora\d?\.(down|up)|^lora_unet_|^lora_te\d?_|\.alpha$)")
UNET_KEY = re.compile(r"(^|\.)(input_blocks|output_blocks|down_blocks|up_blocks)\.\d+\.")
TEXT_KEY = re.compile(r"(^|\.)(text_model\.encoder|encoder\.block\.\d+|shared\.weight|text_encoders?\.|cond_stage_model\.|conditioner\.)")
VAE_KEY = re.compile(r"(^|\.)(encoder\.(down|mid)|decoder\.(up|mid)|first_stage_model\.|vae\.)")
SHOWN = 3


@dataclass
class Recognised:
    """A source's files, understood: its layout, its canonical tensors, and what else it holds."""

    layout: str  # the name of its format in FORMATS
    tensors: dict[str, TensorRef]
    family: Family
    ignored: dict[str, int] = field(default_factory=dict)  # what is not the transformer: group -> keys
    scaled: int = 0  # tensors stored as scaled fp8
    notes: list[str] = field(default_factory=list)  # what is odd in the files but meant (for the plan)


def recognise(source: str, where: str, entries: dict[str, TensorEntry], metadata: dict[str, str]) -> Recognised:
    """The family and layout of a source's tensors (file key -> entry) from their keys; raises SourceError, in
    one line saying what the files look like, when they are not a transformer of a family fluxrecipe knows in
    a layout it reads."""
    prefix = next((p for p in families.comfyui_prefixes() if any(k.startswith(p) for k in entries)), None)
    ignored: dict[str, int] = {}
    model = entries
    if prefix:
        model = {k[len(prefix):]: e for k, e in entries.items() if k.startswith(prefix)}
        ignored = dict(Counter(_group(k) for k in entries if not k.startswith(prefix)))
    if any(LORA_KEY.search(k) for k in model):
        key = next(k for k in model if LORA_KEY.search(k))
        raise SourceError(f"source '{source}': {where} is a LoRA (it holds '{cut(key)}'), not a model: bake it into the merge with the recipe's `loras:`")
    family = families.recognise(model)
    refused = family.refusal(model) if family else None
    if refused:
        raise SourceError(f"source '{source}': {where} is {refused[0]} (it holds '{refused[1]}'), which fluxrecipe does not merge")
    if family and any(family.skips(k) for k in model):  # no part of the model: counted with what else the file holds
        ignored.update(Counter(_group(k) for k in model if family.skips(k)))
        model = {k: e for k, e in model.items() if not family.skips(k)}
    found = family and next((f for f in FORMATS.values() if f.recognises and f.recognises(family, model, prefix or "")), None)
    if found:
        return found.read(found.name, source, where, model, metadata, prefix or "", family, ignored)
    raise SourceError(f"source '{source}': {where} {_looks_like(list(entries))}")


def is_transformer(path: str, entries: dict[str, TensorEntry], metadata: dict[str, str]) -> bool:
    """Whether a file's tensors are a whole transformer of a family fluxrecipe knows, in a layout it reads: what
    an overwrite of a single-file output may replace besides fluxrecipe's own files."""
    try:
        found = recognise("", path, entries, metadata)
        found.family.derive_config({k: t.shape for k, t in found.tensors.items()}, None)
    except (SourceError, ShapeError):
        return False
    return True


def _check_floats(source: str, entries: dict[str, TensorEntry]) -> None:
    odd = next((e for e in entries.values() if e.dtype not in FLOAT_ITEMSIZE and e.dtype not in BLOCK_TYPES), None)
    if odd:
        raise SourceError(f"source '{source}': {odd.file}: tensor '{cut(odd.name)}': unsupported dtype '{odd.dtype}' (a transformer's weights are floating point)")


def _group(key: str) -> str:
    """What a key outside the transformer belongs to, for the plan: 'text_encoders.t5xxl', 'vae', ..."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("text_encoders", "text_encoder") and len(parts) > 2 else parts[0]


def _looks_like(keys: list[str]) -> str:
    """What a set of keys that is no family's transformer looks like, as the end of a sentence."""
    model = f"{families.FAMILIES[-1].name} transformer"  # the oldest family, named as the kind of model expected
    others = [f.name for f in reversed(families.FAMILIES[:-1])]
    nor = f" nor a {' or '.join(others)} one" if others else ""
    if any(LORA_KEY.search(k) for k in keys):
        return f"is a LoRA (it holds '{cut(next(k for k in keys if LORA_KEY.search(k)))}'), not a model: bake it into the merge with the recipe's `loras:`"
    if any(UNET_KEY.search(k) for k in keys):
        return f"looks like a Stable Diffusion / SDXL UNet (it holds '{cut(next(k for k in keys if UNET_KEY.search(k)))}'), not a {model}{nor}"
    kinds = [name for name, rx in (("a text encoder", TEXT_KEY), ("a VAE", VAE_KEY)) if any(rx.search(k) for k in keys)]
    if kinds:
        return f"holds {' and '.join(kinds)} but no {model}{nor} (keys such as {some_keys(keys, SHOWN)})"
    return f"is not a {model}{nor} in a layout fluxrecipe reads (diffusers, Black Forest Labs or ComfyUI): its keys begin like {some_keys(keys, SHOWN)}"


# --- the formats ------------------------------------------------------------------------------------------

Recognises = Callable[[Family, dict[str, TensorEntry], str], bool]  # (family, the model's entries, the ComfyUI prefix) -> its layout?
Read = Callable[..., Recognised]  # (format name, source, where, entries, metadata, prefix, family, ignored) -> the tensors
Write = Callable[..., tuple[OutFile, ...]]  # (shapes, dtypes, scaled keys, shard size, file name, family) -> the output's files


@dataclass(frozen=True)
class Format:
    """One format: what a source in it looks like and how it is read, and how an output in it is laid out."""

    name: str
    single_file: bool  # an output in it is one file (else a folder)
    recognises: Recognises | None = None  # None: not read as a model source
    read: Read | None = None
    write: Write | None = None  # None for a LoRA format: loras.lora_output lays out its file
    lora_scheme: str | None = None  # a LoRA format: the key scheme it writes ("kohya", "diffusers")
    config_file: bool = False  # a folder in it holds the model's config.json (else the config is derived from shapes)
    canonical: bool = False  # its keys are the canonical keys (provenance names the layout of other sources)
    scaled_note: str = ""  # the plan's note when it holds scaled fp8
    suffix: str = ".safetensors"  # of a single-file output's name


def _read_diffusers(name, source, where, model, metadata, prefix, family, ignored) -> Recognised:
    _check_floats(source, model)
    return Recognised(name, diffusers.to_canonical(source, model), family)


def _read_bfl(name, source, where, model, metadata, prefix, family, ignored) -> Recognised:
    """BFL's keys, fused tensors as byte pieces; in ComfyUI's file (behind `prefix`), scaled fp8 read as values x scale."""
    scales, side, notes = bfl.read_scales(source, where, model, metadata, prefix)
    weights = {k: e for k, e in model.items() if k not in set(side)}
    _check_floats(source, weights)
    tensors, unknown = bfl.to_canonical(source, weights, scales, family)
    if unknown:
        raise SourceError(
            f"source '{source}': {where} holds {len(unknown)} key(s) a {family.name} transformer in Black Forest Labs' layout does not have "
            f"({some_keys(unknown, SHOWN)}): is it a {family.name} model?"
        )
    return Recognised(name, tensors, family, ignored, scaled=len(scales), notes=notes)


def _in_gguf(model: dict[str, TensorEntry]) -> bool:
    return any(isinstance(e, GGUFEntry) for e in model.values())


def _write_diffusers(shapes, dtypes, scaled, shard_size, file_name, family) -> tuple[OutFile, ...]:
    return diffusers.out_files(diffusers.out_tensors(shapes, dtypes), shard_size, ())


def _write_bfl(shapes, dtypes, scaled, shard_size, file_name, family, comfyui: bool = False) -> tuple[OutFile, ...]:
    return bfl.out_file(shapes, dtypes, scaled, file_name, family, family.comfyui_prefixes[0] if comfyui else "")


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "diffusers", single_file=False, recognises=lambda family, model, prefix: not prefix and family.is_diffusers(model) and not family.is_bfl(model),  # BFL keys win
            read=_read_diffusers, write=_write_diffusers, config_file=True, canonical=True,
        ),
        Format(
            "bfl", single_file=True, recognises=lambda family, model, prefix: not prefix and family.is_bfl(model) and not _in_gguf(model), read=_read_bfl, write=_write_bfl,
            scaled_note="fp8_scaled is ComfyUI's convention: readers that do not know it (diffusers' from_single_file, BFL's code) would read the fp8 values unscaled; format=comfyui says what the file is",
        ),
        Format("comfyui", single_file=True, recognises=lambda family, model, prefix: bool(prefix) and family.is_bfl(model) and not _in_gguf(model), read=_read_bfl, write=partial(_write_bfl, comfyui=True)),
        Format("lora", single_file=True, lora_scheme="kohya"),
        Format("lora_peft", single_file=True, lora_scheme="diffusers"),
        Format("lora_comfyui", single_file=True, lora_scheme="comfyui"),
        # BFL's keys in a GGUF file (gguf_model.py): read as BFL, its blocks dequantized by the kernel; written as BFL with ggml types
        Format("gguf", single_file=True, recognises=lambda family, model, prefix: family.is_bfl(model) and _in_gguf(model), read=_read_bfl, write=_write_bfl, suffix=".gguf"),
    )
}
