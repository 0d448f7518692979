"""GGUF at the byte level: a stranger's header read and checked, a header encoded for a file written front to
back, and tensors (de)quantized chunk by chunk exactly as the `gguf` package does.

The `gguf` package gives the format's constants, block sizes and (de)quantizers, but its reader maps the whole
file and trusts it, and its writer holds every tensor until the end: the header is parsed and encoded here.
Layout (little-endian): magic `GGUF`, u32 version (2 or 3), u64 tensor count, u64 KV count; the KVs (string
key, u32 value type, value; a string is a u64 length and UTF-8 bytes, an array a u32 item type, a u64 count
and the items); one info per tensor (name, u32 n_dims, u64 dims innermost first, so PyTorch's shape reversed,
u32 ggml type, u64 offset from the data start); zero padding to `general.alignment` (32 unless given); the
data, each tensor at an aligned offset and, as gguf's writer and ggml lay it out, padded to the alignment.
Quant blocks run along the innermost dimension (a row): a run of whole blocks, and so any run of whole rows,
(de)quantizes on its own to the bytes (values) it has in the whole tensor. A tensor is described by the
safetensors module's TensorEntry with the ggml type's name as dtype: F32, F16 and BF16 data are laid out
exactly as in safetensors (little-endian, row-major, PyTorch's shape), the other types are blocks.

What the tools expect of a FLUX file (details, with sources, in the wiring notes of the GGUF issue):
ComfyUI-GGUF's convert.py writes `general.architecture = "flux"` (also for Chroma and FLUX.2, which it
detects by the same keys), `general.quantization_version = 2`, `general.file_type` (a `LlamaFileType`),
BFL tensor names without a prefix, shapes as they are (no reshaping for FLUX), alignment 32; it keeps 1-D
tensors and tensors of at most 1024 elements in F32, and its llama.cpp patch leaves the modules before and
after the blocks (FLUX.1's embedders and final layer) unquantized (their source dtype). Its loader
accepts the architectures of its IMG_ARCH_LIST ("flux", ...). diffusers' `load_gguf_checkpoint` keeps F32
and F16 tensors as plain tensors and wraps every other type its dequantizers know (BF16, Q4_0..Q8_0,
Q2_K..Q6_K, IQ4_NL, IQ4_XS) as `GGUFParameter` holding the raw bytes, then converts BFL names as for a
safetensors file: so 1-D tensors (biases, norm scales) must be F32 or F16, never BF16 or a quant type. Its
dequantizers compute the legacy quants in float16 (Q8_0, Q5_0, Q4_0: gguf's float32 values rounded once).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from functools import cache
from typing import BinaryIO, Sequence

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValue, GGUFValueType, LlamaFileType

from ..errors import FluxRecipeError, SourceError, UsageError
from ..text import cut
from .safetensors import TensorEntry, _check_no_overlap

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # 1 had 32-bit counts and lengths; gguf's reader and ggml read 2 and 3
WRITTEN_VERSION = gguf.GGUF_VERSION
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
ALIGNMENT_KEY = gguf.Keys.General.ALIGNMENT
MAX_DIMS = 4  # GGML_MAX_DIMS

# Bounds on a stranger's header, so that reading one never allocates more than a few tens of MB. A FLUX
# transformer's header is ~100 KB (~1000 tensors, a few KVs); an LLM's, with its tokenizer, a few MB.
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 1 << 16
MAX_KVS = 1 << 16
MAX_NESTING = 4  # arrays of arrays of ...
MAX_DECODED_ITEMS = 1 << 18  # array items decoded in all; longer arrays (tokenizers) become UndecodedArray

SCALARS: dict[GGUFValueType, struct.Struct] = {
    GGUFValueType[name]: struct.Struct("<" + code)
    for name, code in (("UINT8", "B"), ("INT8", "b"), ("UINT16", "H"), ("INT16", "h"), ("UINT32", "I"), ("INT32", "i"),
                       ("FLOAT32", "f"), ("BOOL", "?"), ("UINT64", "Q"), ("INT64", "q"), ("FLOAT64", "d"))
}
U32, U64 = SCALARS[GGUFValueType.UINT32], SCALARS[GGUFValueType.UINT64]
# The fewest bytes an item of each type takes, to check an array's count before reading it.
MIN_ITEM_BYTES = {**{t: s.size for t, s in SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# The types fluxrecipe writes (gguf_type=..., a rule's dtype), the default first. K-quants are not offered: the
# gguf package has no quantizer for them (only dequantizers), and ggml's is not in a maintained Python package.
OUTPUT_TYPES: tuple[GGMLQuantizationType, ...] = tuple(
    GGMLQuantizationType[name] for name in ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "BF16", "F16", "F32")
)
DEFAULT_OUTPUT_TYPE = GGMLQuantizationType.Q8_0
# general.file_type of a file whose large tensors are of that type (llama.cpp's llama_ftype).
FILE_TYPES: dict[GGMLQuantizationType, LlamaFileType] = {
    t: LlamaFileType.ALL_F32 if t == GGMLQuantizationType.F32 else LlamaFileType[f"MOSTLY_{t.name}"] for t in OUTPUT_TYPES
}
# ComfyUI-GGUF's convert.py keeps tensors of at most this many elements (and all 1-D tensors) in F32.
SMALL_TENSOR_ELEMENTS = 1024
# The ggml types stored in blocks of several elements, by name: (elements, bytes) per block. (F32, F16 and
# BF16 are one element a block, laid out as in safetensors, and known by the same names.)
BLOCK_TYPES: dict[str, tuple[int, int]] = {t.name: sizes for t, sizes in GGML_QUANT_SIZES.items() if sizes[0] > 1}


class GGUFEntry(TensorEntry):
    """A tensor of a GGUF file (its dtype a ggml type's name): what tells a GGUF source from a safetensors one
    whose keys are the same."""


@dataclass(frozen=True)
class UndecodedArray:
    """A metadata array too long to keep (a tokenizer's vocabulary, never a transformer's): what it holds."""

    item_type: GGUFValueType
    count: int


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, GGUFValue]  # in file order; an array's items in `value`, their type in `sub_type`
    tensors: dict[str, TensorEntry]  # in file order; dtype: the ggml type's name (F32, F16, BF16 as in safetensors)
    alignment: int
    data_start: int  # absolute offset of the data section
    size: int  # of the whole file


@dataclass(frozen=True)
class EncodedHeader:
    """A GGUF file planned before any tensor is computed: write `data`, then each tensor's bytes at its
    `begin`, zeros in between and after the last one up to `size` (as gguf's writer pads)."""

    data: bytes  # the file's first bytes: header, KVs, tensor infos and the padding to the data start
    tensors: tuple[TensorEntry, ...]
    size: int


# ---------------------------------------------------------------------------------------------- reading


def read_header(path: str) -> GGUFHeader:
    """Parse and check the header of the GGUF file `path` (never its tensor data); every defect is one
    `SourceError` line naming the file and the key or tensor at fault."""
    try:
        with open(path, "rb") as f:
            return parse_header(path, f, os.fstat(f.fileno()).st_size)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from e


def parse_header(path: str, f: BinaryIO, size: int) -> GGUFHeader:
    """The header of the `size`-byte GGUF file `path`, read front to back from `f` (positioned at its start)."""
    cursor = _Cursor(path, f, size)
    magic = cursor.take(4, "the magic number")
    if magic != MAGIC:
        raise SourceError(f"{path}: not a GGUF file (it begins with {magic!r}, not {MAGIC!r})")
    version = cursor.u32("the version")
    if int.from_bytes(U32.pack(version), "big") in VERSIONS:
        raise SourceError(f"{path}: a big-endian GGUF file; fluxrecipe reads little-endian GGUF files")
    if version not in VERSIONS:
        raise SourceError(f"{path}: GGUF version {version}; fluxrecipe reads versions {' and '.join(map(str, VERSIONS))}")
    n_tensors, n_kvs = cursor.u64("the tensor count"), cursor.u64("the metadata count")
    if n_tensors > MAX_TENSORS or n_kvs > MAX_KVS:
        raise SourceError(f"{path}: the header claims {n_tensors} tensors and {n_kvs} metadata keys (fluxrecipe reads at most {MAX_TENSORS} and {MAX_KVS})")
    cursor.need(n_kvs * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES, f"{n_tensors} tensor infos and {n_kvs} metadata keys")
    metadata: dict[str, GGUFValue] = {}
    for index in range(n_kvs):
        key = cursor.string(f"metadata key #{index}", name=True)
        if key in metadata:
            raise SourceError(f"{path}: metadata key '{cut(key)}' is given twice")
        metadata[key] = cursor.value(key)
    alignment = _alignment(path, metadata)
    infos = [_tensor_info(cursor, index) for index in range(n_tensors)]
    data_start = _pad(cursor.position, alignment)
    tensors: dict[str, TensorEntry] = {}
    for name, dims, ggml_type, offset in infos:
        if name in tensors:
            raise SourceError(f"{path}: tensor '{name}' is given twice")
        tensors[name] = _checked_tensor(path, name, dims, ggml_type, offset, alignment, data_start, size)
    _check_no_overlap(path, tensors.values())
    return GGUFHeader(path, version, metadata, tensors, alignment, data_start, size)


class _Cursor:
    """Reads a header front to back, never past the end of the file or MAX_HEADER_BYTES, and decodes values
    within the bounds above."""

    def __init__(self, path: str, f: BinaryIO, size: int) -> None:
        self.path, self.f, self.size = path, f, size
        self.position = 0
        self.items_left = MAX_DECODED_ITEMS

    def need(self, n: int, what: str) -> None:
        """Refuse, before reading or allocating anything, `n` more bytes that the file or the bounds lack."""
        end = self.position + n
        if end > self.size:
            raise SourceError(f"{self.path}: {what} runs past the end of the file ({self.size} bytes): the file is truncated or not GGUF")
        if end > MAX_HEADER_BYTES:
            raise SourceError(f"{self.path}: {what} runs past the first {MAX_HEADER_BYTES >> 20} MiB, more header than fluxrecipe reads (a FLUX transformer's is ~100 KB)")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:
            raise SourceError(f"{self.path}: {what} runs past the end of the file: the file is truncated")
        self.position += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.position += n

    def u32(self, what: str) -> int:
        return U32.unpack(self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return U64.unpack(self.take(8, what))[0]

    def string(self, what: str, name: bool = False) -> str:
        """A string; a key's or a tensor's `name` must be printable (messages show it), a value need not be."""
        raw = self.take(self.u64(what), what)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.path}: {what} is not UTF-8 ({raw[:40]!r})") from None
        if name and not text.isprintable():  # control characters would reach the terminal in every message about it
            raise SourceError(f"{self.path}: {what} {text[:80]!r} holds unprintable characters")
        return text

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise SourceError(f"{self.path}: {what} has unknown value type {raw}") from None

    def value(self, key: str) -> GGUFValue:
        value_type = self.value_type(f"metadata '{cut(key)}'")
        if value_type != GGUFValueType.ARRAY:
            return GGUFValue(self.scalar(value_type, key), value_type)
        item_type = self.value_type(f"metadata '{cut(key)}' (its items)")
        return GGUFValue(self.array(item_type, key, depth=1), value_type, item_type)

    def scalar(self, value_type: GGUFValueType, key: str) -> object:
        if value_type == GGUFValueType.STRING:
            return self.string(f"metadata '{cut(key)}'")
        layout = SCALARS[value_type]
        return layout.unpack(self.take(layout.size, f"metadata '{cut(key)}'"))[0]

    def array(self, item_type: GGUFValueType, key: str, depth: int, keep: bool = True) -> list | UndecodedArray:
        """An array's items after its item type: the count, then the items, decoded while the budget lasts
        (and while `keep`: the items of an array too long to keep are only walked over)."""
        what = f"metadata '{cut(key)}'"
        if depth > MAX_NESTING:
            raise SourceError(f"{self.path}: {what} nests arrays deeper than {MAX_NESTING} levels")
        count = self.u64(what)
        self.need(count * MIN_ITEM_BYTES[item_type], f"{what} ({count} items)")
        keep = keep and count <= self.items_left
        if keep:
            self.items_left -= count
        if item_type in SCALARS:
            layout = SCALARS[item_type]
            if keep:
                return list(struct.unpack(f"<{count}{layout.format[1:]}", self.take(count * layout.size, what)))
            self.skip(count * layout.size, what)
        elif item_type == GGUFValueType.STRING and keep:
            return [self.string(what) for _ in range(count)]
        elif item_type == GGUFValueType.STRING:
            for _ in range(count):
                self.skip(self.u64(what), what)
        else:
            items = []
            for _ in range(count):
                item = self.array(self.value_type(f"{what} (its items)"), key, depth + 1, keep)
                if keep:
                    items.append(item)
            if keep and not any(isinstance(item, UndecodedArray) for item in items):
                return items  # kept whole, or not at all
        return UndecodedArray(item_type, count)


def _alignment(path: str, metadata: dict[str, GGUFValue]) -> int:
    given = metadata.get(ALIGNMENT_KEY)
    if given is None:
        return DEFAULT_ALIGNMENT
    if given.type != GGUFValueType.UINT32 or given.value == 0 or given.value & (given.value - 1):
        raise SourceError(f"{path}: metadata '{ALIGNMENT_KEY}' must be a power of two stored as UINT32, not {given.type.name} {given.value!r}")
    return given.value


def _tensor_info(cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string(f"the name of tensor #{index}", name=True)
    what = f"tensor '{name}'"
    n_dims = cursor.u32(what)
    if n_dims > MAX_DIMS:
        raise SourceError(f"{cursor.path}: {what} has {n_dims} dimensions (GGUF allows at most {MAX_DIMS})")
    dims = struct.unpack(f"<{n_dims}Q", cursor.take(8 * n_dims, what))
    ggml_type = cursor.u32(what)
    return name, dims, ggml_type, cursor.u64(what)


def _checked_tensor(path: str, name: str, dims: tuple[int, ...], raw_type: int, offset: int, alignment: int, data_start: int, size: int) -> TensorEntry:
    where = f"{path}: tensor '{name}'"
    ggml_type = _ggml_type(raw_type)
    if ggml_type is None:
        raise SourceError(f"{where}: unknown ggml type {raw_type} (the gguf package knows {', '.join(t.name for t in GGML_QUANT_SIZES)})")
    shape = tuple(reversed(dims))
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims and dims[0] % block_size:
        raise SourceError(f"{where}: rows of {dims[0]} elements are not whole {ggml_type.name} blocks of {block_size}")
    if any(d > size * block_size for d in dims):  # before the product, which could be astronomically large
        raise SourceError(f"{where}: shape {list(shape)} is larger than the whole file ({size} bytes) can hold")
    nbytes = math.prod(dims) // block_size * type_size
    if offset % alignment:
        raise SourceError(f"{where}: data offset {offset} is not a multiple of the file's alignment ({alignment})")
    begin = data_start + offset
    if begin + nbytes > size:
        raise SourceError(f"{where}: {ggml_type.name} {list(shape)} needs {nbytes} bytes from byte {begin}, past the end of the file ({size} bytes): the file is truncated or its header is corrupt")
    return GGUFEntry(path, name, ggml_type.name, shape, begin, nbytes)


def _ggml_type(raw: int) -> GGMLQuantizationType | None:
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        return None
    return ggml_type if ggml_type in GGML_QUANT_SIZES else None


# ---------------------------------------------------------------------------------------------- writing


def encode_header(path: str, metadata: dict[str, GGUFValue], tensors: Sequence[tuple[str, tuple[int, ...], GGMLQuantizationType]]) -> EncodedHeader:
    """The header of the GGUF file `path` holding `metadata` (in order) and `tensors` (name, shape in
    PyTorch's order, ggml type; in order), byte for byte as gguf's GGUFWriter writes it, and where each
    tensor's bytes go. The alignment is `general.alignment` where `metadata` gives it (a power of two, as
    UINT32), else 32."""
    alignment = _alignment(path, metadata)
    out = bytearray(MAGIC)
    out += U32.pack(WRITTEN_VERSION) + U64.pack(len(tensors)) + U64.pack(len(metadata))
    for key, value in metadata.items():
        out += _encode_string(key) + U32.pack(value.type) + _encode_value(value.value, value.type, value.sub_type)
    placed = []
    offset = 0
    for name, shape, ggml_type in tensors:
        nbytes = tensor_nbytes(shape, ggml_type)
        out += _encode_string(name) + U32.pack(len(shape))
        out += struct.pack(f"<{len(shape)}Q", *reversed(shape)) + U32.pack(ggml_type) + U64.pack(offset)
        placed.append((name, tuple(shape), ggml_type, offset, nbytes))
        offset += _pad(nbytes, alignment)
    data_start = _pad(len(out), alignment)
    out += bytes(data_start - len(out))
    entries = tuple(GGUFEntry(path, name, ggml_type.name, shape, data_start + offset, nbytes) for name, shape, ggml_type, offset, nbytes in placed)
    return EncodedHeader(bytes(out), entries, data_start + offset)


def _encode_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return U64.pack(len(raw)) + raw


def _encode_value(value: object, value_type: GGUFValueType, sub_type: GGUFValueType | None = None) -> bytes:
    """One value, as GGUFWriter._pack_val packs it (an array's item type given, or taken from its first item)."""
    if value_type == GGUFValueType.STRING:
        return _encode_string(value)
    if value_type != GGUFValueType.ARRAY:
        return SCALARS[value_type].pack(value)
    if not isinstance(value, (list, tuple, bytes)) or not value:
        raise ValueError(f"a GGUF array must be a non-empty sequence, not {value!r}")
    item_type = sub_type if sub_type is not None else GGUFValueType.UINT8 if isinstance(value, bytes) else GGUFValueType.get_type(value[0])
    if sub_type is None and not isinstance(value, bytes) and any(GGUFValueType.get_type(v) != item_type for v in value):
        raise ValueError("all items of a GGUF array must be of one type")
    return U32.pack(item_type) + U64.pack(len(value)) + b"".join(_encode_value(v, item_type) for v in value)


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# ---------------------------------------------------------------------------------------------- types and data


def output_type(name: str, where: str, error: type[FluxRecipeError] = UsageError) -> GGMLQuantizationType:
    """The ggml type an output option or a rule's dtype names (`Q8_0`, `q4_0`, `bf16`, ...); anything else is
    one `error` line, starting with `where`, that lists the types offered."""
    ggml_type = GGMLQuantizationType.__members__.get(name.upper())
    if ggml_type in OUTPUT_TYPES:
        return ggml_type
    offered = ", ".join(t.name for t in OUTPUT_TYPES)
    why = ""
    if ggml_type is not None and ggml_type not in quantizable_types():
        why = f": the gguf package cannot quantize {ggml_type.name} bit-exactly as ggml does"
    elif ggml_type is not None:
        why = f": {ggml_type.name} is not a type fluxrecipe writes"
    raise error(f"{where}={name} is not offered{why}; GGUF outputs are {offered}")


def storage_type(shape: Sequence[int], wanted: GGMLQuantizationType, high_precision: GGMLQuantizationType = GGMLQuantizationType.BF16) -> GGMLQuantizationType:
    """The type a tensor is stored in when `wanted` is asked for, by ComfyUI-GGUF's convert.py rules: 1-D
    tensors and tensors of at most 1024 elements stay F32; rows that are not whole blocks of `wanted` fall
    back to `high_precision` (llama.cpp's image-model patch falls back likewise). The family's own
    high-precision layers (its embedders, its final layer, ...) are the planner's to name."""
    if len(shape) <= 1 or math.prod(shape) <= SMALL_TENSOR_ELEMENTS:
        return GGMLQuantizationType.F32
    if shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return high_precision
    return wanted


def tensor_nbytes(shape: Sequence[int], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` (PyTorch's order) in `ggml_type`; its rows must be whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape and shape[-1] % block_size:
        raise ValueError(f"rows of {shape[-1]} elements are not whole {ggml_type.name} blocks of {block_size}")
    return math.prod(shape) // block_size * type_size


def quantize_chunk(values, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """float32 values -> their bytes in `ggml_type` (uint8, rows of bytes in the shape of `values`' rows).

    `values` (numpy or a CPU torch tensor) is a run of whole blocks of the row-major tensor: whole rows always
    are (GGUF blocks run along the innermost dimension). The bytes equal those of the same positions in
    `gguf.quants.quantize` of the whole tensor, as every block is quantized on its own."""
    array = np.ascontiguousarray(values.numpy() if hasattr(values, "numpy") else values, dtype=np.float32)
    row_bytes = tensor_nbytes(array.shape[-1:], ggml_type)  # refuses rows that are not whole blocks
    if not array.size:  # gguf's quantizers fail on an empty array
        return np.zeros((*array.shape[:-1], row_bytes), np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(array, ggml_type)).view(np.uint8)


def dequantize_chunk(data, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Bytes of whole blocks of a `ggml_type` tensor (bytes, memoryview or uint8 array) -> float32 values,
    flat and writable, bit for bit as `gguf.quants.dequantize` gives them."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data).view(np.uint8).reshape(-1)
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    if raw.size % type_size:
        raise ValueError(f"{raw.size} bytes are not whole {ggml_type.name} blocks of {type_size} bytes")
    if not raw.size:  # gguf's dequantizers fail on an empty array
        return np.zeros(0, np.float32)
    with np.errstate(all="ignore"):  # a stranger's NaN/inf scales: the executor's finite check reports them in one line
        values = gguf.quants.dequantize(raw, ggml_type).reshape(-1)
    return values.copy() if np.shares_memory(values, raw) else values  # F32 is a view of the bytes


@cache
def quantizable_types() -> frozenset[GGMLQuantizationType]:
    """The types the installed gguf package quantizes (it has no quantizer for K-quants)."""
    return frozenset(t for t in GGML_QUANT_SIZES if _works(lambda: gguf.quants.quantize(np.zeros(GGML_QUANT_SIZES[t][0], np.float32), t)))


@cache
def readable_types() -> frozenset[GGMLQuantizationType]:
    """The types the installed gguf package dequantizes: what a GGUF source may hold."""
    return frozenset(t for t in GGML_QUANT_SIZES if _works(lambda: gguf.quants.dequantize(np.zeros(GGML_QUANT_SIZES[t][1], np.uint8), t)))


def _works(call) -> bool:
    try:
        call()
    except NotImplementedError:
        return False
    return True
