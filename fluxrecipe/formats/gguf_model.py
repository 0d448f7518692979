"""A FLUX transformer in a GGUF file, both ways: what a GGUF source must be, which ggml type each tensor of a
`format=gguf` output is stored in, and the file's metadata (gguf.py has the bytes).

A GGUF FLUX file is a Black Forest Labs file in another container (ComfyUI-GGUF's convert.py writes BFL names
without a prefix, shapes as they are): so a GGUF source is read as BFL keys (bfl.py), its quantized tensors
dequantized by the kernel block by block, and an output is laid out as a BFL file whose tensors have ggml
types. Types follow ComfyUI-GGUF's convert.py and its llama.cpp patch (gguf.py's docstring): 1-D and small
tensors F32, the family's layers outside the blocks (its `high_precision` rule) BF16 unless a rule names a
type, every other tensor the whole file's type (`gguf_type=`) or its rule's `dtype:`.
"""

from __future__ import annotations

from collections import Counter

from gguf import GGMLQuantizationType, GGUFValue, GGUFValueType

from ..errors import OutputError, PlanError, SourceError
from ..families import Family
from ..text import cut, some_keys
from .gguf import (
    BLOCK_TYPES, DEFAULT_OUTPUT_TYPE, FILE_TYPES, MAGIC, OUTPUT_TYPES, EncodedHeader, encode_header, output_type, read_header, readable_types, storage_type,
)
from . import bfl
from .layout import OutFile
from .safetensors import Header

ARCHITECTURE = "flux"  # general.architecture of every FLUX family's file, as ComfyUI-GGUF's convert.py writes it
QUANTIZATION_VERSION = 2  # general.quantization_version: ggml's block layouts of today
RESHAPED_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF's mark of a tensor stored in another shape (never FLUX's)
ROOM_KEY = "fluxrecipe.header_room"  # spaces that keep the header's size when metadata known at the end goes in
HIGH_PRECISION = GGMLQuantizationType.BF16  # the family's high-precision layers, as the llama.cpp patch keeps them
BLOCK_QUANTS = frozenset(t for t in OUTPUT_TYPES if t.name in BLOCK_TYPES)  # the types that lose precision
# A rule's dtype names -> the ggml type it means in a GGUF file (the recipe's names, and the GGUF types' own).
RULE_TYPES: dict[str, GGMLQuantizationType] = {
    **{t.name.lower(): t for t in OUTPUT_TYPES},
    "bfloat16": GGMLQuantizationType.BF16, "fp16": GGMLQuantizationType.F16, "float16": GGMLQuantizationType.F16,
    "fp32": GGMLQuantizationType.F32, "float32": GGMLQuantizationType.F32,
}


def is_gguf(path: str) -> bool:
    """Whether a file begins with GGUF's magic number (a source is told by its content, not its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None


def source_header(path: str) -> Header:
    """The header of a GGUF source as a safetensors one (its tensors GGUFEntry, its string metadata), checked
    to be a FLUX file whose every tensor the gguf package dequantizes; anything else is one SourceError line."""
    header = read_header(path)
    arch = header.metadata.get("general.architecture")
    if arch is not None and arch.value != ARCHITECTURE:
        shown = cut(str(arch.value)) if arch.type == GGUFValueType.STRING else f"{arch.type.name} {arch.value!r}"
        raise SourceError(f"{path}: a GGUF file of architecture '{shown}' (general.architecture), not a FLUX transformer (whose GGUF files say '{ARCHITECTURE}')")
    reshaped = next((k for k in header.metadata if k.startswith(RESHAPED_KEY)), None)
    if reshaped:
        raise SourceError(f"{path}: tensor '{cut(reshaped[len(RESHAPED_KEY):])}' is stored reshaped ({cut(reshaped)}), which no FLUX transformer's GGUF file does")
    for entry in header.tensors.values():
        if GGMLQuantizationType[entry.dtype] not in readable_types():
            raise SourceError(f"{path}: tensor '{cut(entry.name)}' is {entry.dtype}, which the gguf package cannot dequantize")
    strings = {k: v.value for k, v in header.metadata.items() if v.type == GGUFValueType.STRING}
    return Header(path, dict(header.tensors), strings, header.data_start, header.size)


# ---------------------------------------------------------------------------------------------- types


def file_type(name: str | None) -> GGMLQuantizationType:
    """`gguf_type=` (None: the default, Q8_0) -> the whole file's ggml type (one UsageError line listing the
    types offered)."""
    return DEFAULT_OUTPUT_TYPE if name is None else output_type(name, "gguf_type")


def rule_type(name: str, where: str) -> GGMLQuantizationType:
    """A rule's `dtype:` -> the ggml type it asks of a GGUF output (one PlanError line for fp8, which GGUF lacks)."""
    if name in RULE_TYPES:
        return RULE_TYPES[name]
    offered = ", ".join(t.name.lower() for t in OUTPUT_TYPES)
    raise PlanError(f"{where}: dtype {name} cannot be written in a GGUF file (format=gguf): a rule's dtype there is one of {offered}")


def wanted_type(key: str, shape: tuple[int, ...], wanted: GGMLQuantizationType, named: bool, family: Family) -> GGMLQuantizationType:
    """The type a canonical tensor asks for: `wanted` (the rule's type when `named`, else the file's), but high
    precision where the family keeps it so (unless its rule names a type)."""
    if not named and wanted in BLOCK_QUANTS and family.high_precision(key, shape):
        return HIGH_PRECISION
    return wanted


def stored_types(shapes: dict[str, tuple[int, ...]], wanted: dict[str, str], family: Family) -> dict[str, str]:
    """Canonical key -> the type it is stored in: its wanted type, unless the file's tensor it is part of (a
    fused one, in BFL's layout) is 1-D or small (F32) or has rows that are not whole blocks (BF16), by
    ComfyUI-GGUF's rules (storage_type)."""
    stored = {}
    for tensor in bfl.out_tensors(shapes, wanted, "", family.bfl):  # refuses a fused tensor of two types
        kept = storage_type(tensor.shape, GGMLQuantizationType[tensor.dtype])
        stored.update(dict.fromkeys((p.key for p in tensor.parts), kept.name))
    return stored


def type_lines(out: OutFile) -> list[str]:
    """The plan's lines on the file's types: per type, how many tensors, which (a few by name), and why."""
    by_type: dict[str, list[str]] = {}
    for t in out.tensors:
        by_type.setdefault(t.dtype, []).append(t.name)
    counts = Counter({dtype: len(names) for dtype, names in by_type.items()})
    return [f"  {dtype:<5} {n:>5} tensors  {some_keys(by_type[dtype], 4)}" for dtype, n in counts.most_common()]


# ---------------------------------------------------------------------------------------------- the file


def metadata(whole_file: GGMLQuantizationType, strings: dict[str, str]) -> dict[str, GGUFValue]:
    """The file's KVs: what ComfyUI-GGUF's loader and convert.py write (architecture, quantization version,
    file type), then fluxrecipe's own (`strings`: version, pinned recipe, provenance, ...), in that order."""
    kvs = {
        "general.architecture": GGUFValue(ARCHITECTURE, GGUFValueType.STRING),
        "general.quantization_version": GGUFValue(QUANTIZATION_VERSION, GGUFValueType.UINT32),
        "general.file_type": GGUFValue(int(FILE_TYPES[whole_file]), GGUFValueType.UINT32),
    }
    return kvs | {k: GGUFValue(v, GGUFValueType.STRING) for k, v in strings.items()}


def encode(path: str, out: OutFile, kvs: dict[str, GGUFValue], size: int = 0) -> EncodedHeader:
    """The header of the output file `out` holding `kvs`, filled with spaces (under ROOM_KEY) to `size` bytes
    when given, so that a header written again with more metadata lands the tensors where they are."""
    tensors = [(t.name, t.shape, GGMLQuantizationType[t.dtype]) for t in out.tensors]
    bare = encode_header(path, {**kvs, ROOM_KEY: GGUFValue("", GGUFValueType.STRING)}, tensors)
    if not size:
        return bare
    start = bare.tensors[0].begin if bare.tensors else bare.size
    room = size - start
    if room < 0:
        raise OutputError(f"{path}: the metadata ({start} bytes of header) does not fit the {size} bytes reserved for it")
    return encode_header(path, {**kvs, ROOM_KEY: GGUFValue(" " * room, GGUFValueType.STRING)}, tensors)
