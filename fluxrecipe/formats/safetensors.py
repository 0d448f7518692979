"""The safetensors file format, both ways: parse and check a header, encode one.

safetensors' own Python API reads through mmap and does not say where a tensor's bytes lie. The merge needs
exactly that (to read a tensor in row chunks with `pread`, to copy bytes undecoded, and to let go of the
page cache behind it), so the header is parsed here. The format is small: 8 bytes of little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`, then
the data; offsets count from the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import SourceError
from ..files import open_regular
from ..text import cut

# safetensors dtype code -> bytes per element (plain numbers, so that planning and dry runs need no torch;
# execute.py maps the codes to torch dtypes). A FLUX transformer's weights are floating point; the integer
# codes are read so that files holding side data (ComfyUI's `comfy_quant` markers, a LoRA's step counter)
# can be parsed, and the formats decide what such a tensor means.
FLOAT_ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
ITEMSIZE: dict[str, int] = {**FLOAT_ITEMSIZE, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# the dtypes a scalar (a LoRA's alpha, a scaled-fp8 scale) is read in without torch: struct formats
SCALARS = {"F64": "<d", "F32": "<f", "F16": "<e", "BF16": "bf16", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: its dtype, shape and the absolute byte range of its data."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: str
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int = 0  # absolute offset of the data: 8 + the header's length
    size: int = 0  # of the whole file


def read_header(path: str) -> Header:
    """Parse and check the header of `path`; every defect is a `SourceError` naming the file and key."""
    try:
        with os.fdopen(open_regular(path), "rb") as f:  # a FIFO named like a model file must not block the run
            size = os.fstat(f.fileno()).st_size
            length = header_length(path, f.read(8), size)
            raw = f.read(length)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_header(path, raw, size)


def header_length(path: str, prefix: bytes, size: int) -> int:
    """The header's length, from a file's first 8 bytes and its size (a local file, or one on the hub)."""
    if size < 8 or len(prefix) < 8:
        raise SourceError(f"{path}: truncated safetensors file ({size} bytes, shorter than its 8-byte header length)")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise SourceError(f"{path}: header length {length} is larger than safetensors allows ({MAX_HEADER_BYTES}); not a safetensors file?")
    if 8 + length > size:
        raise SourceError(f"{path}: header length {length} runs past the end of the file ({size} bytes): the file is truncated or not safetensors")
    return length


def parse_header(path: str, raw: bytes, size: int) -> Header:
    """The header `raw` (the bytes after the length) of the `size`-byte file `path`, parsed and checked."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise SourceError(f"{path}: the safetensors header gives '{cut(e.args[0])}' twice (a tensor or field named twice)") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an integer too long, nested too deep
        raise SourceError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{path}: the safetensors header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SourceError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    data_size = size - data_start
    entries = {name: _entry(path, name, info, data_start, data_size) for name, info in doc.items()}
    _check_no_overlap(path, entries.values())
    return Header(path=path, entries=entries, metadata=metadata, data_start=data_start, size=size)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json's object hook that refuses a name given twice (json itself keeps the last one silently)."""
    doc: dict[str, object] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def _entry(path: str, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    if not name.isprintable():  # control characters in a name would reach the terminal in every message about it
        raise SourceError(f"{path}: tensor name {cut(name)!r} holds unprintable characters")
    where = f"{path}: tensor '{cut(name)}'"
    if not isinstance(info, dict):
        raise SourceError(f"{where}: header entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise SourceError(f"{where}: unsupported dtype {dtype!r} (fluxrecipe reads {', '.join(ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise SourceError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise SourceError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise SourceError(f"{where}: data_offsets {offsets} hold {end - begin} bytes but {dtype} {shape} needs {expected}")
    if end > data_size:
        raise SourceError(f"{where}: data ends at byte {end} but the file holds only {data_size} bytes of data: the file is truncated or its header is corrupt")
    return TensorEntry(file=path, name=name, dtype=dtype, shape=tuple(shape), begin=data_start + begin, nbytes=expected)


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_no_overlap(path: str, entries) -> None:
    previous = None
    for e in sorted((e for e in entries if e.nbytes), key=lambda e: e.begin):
        if previous is not None and e.begin < previous.begin + previous.nbytes:
            raise SourceError(f"{path}: the data of tensors '{cut(previous.name)}' and '{cut(e.name)}' overlap")
        previous = e


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str], size: int = 0) -> tuple[bytes, int]:
    """The header (length prefix included, padded with spaces to 8 bytes, and to `size` bytes if it is
    shorter) for tensors stored back to back in this order, and the size of the data that follows it.

    Padding to a size given up front lets a writer put metadata that is known only at the end (a run's
    counts, the data's hash) into the header of a file already written: see `writer.rewrite_header`."""
    doc: dict[str, object] = {"__metadata__": metadata}
    position = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * max(-len(raw) % 8, size - 8 - len(raw))
    return len(raw).to_bytes(8, "little") + raw, position


def read_bytes(entry: TensorEntry, start: int = 0, nbytes: int | None = None) -> bytes:
    """Bytes [start, start + nbytes) of a tensor's data (all of it by default): the few bytes of side data
    a plan reads (alphas, scales, quantization markers)."""
    nbytes = entry.nbytes - start if nbytes is None else nbytes
    try:
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            raw = os.pread(fd, nbytes, entry.begin + start)
        finally:
            os.close(fd)
    except OSError as e:
        raise SourceError(f"{entry.file}: reading '{cut(entry.name)}' failed: {e.strerror or e}") from None
    if len(raw) != nbytes:
        raise SourceError(f"{entry.file}: the file ended inside '{cut(entry.name)}'")
    return raw


def read_scalar(entry: TensorEntry) -> float:
    """The one value of a scalar tensor of a SCALARS dtype, read without torch."""
    raw = read_bytes(entry)
    fmt = SCALARS[entry.dtype]
    if fmt == "bf16":
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    return float(struct.unpack(fmt, raw)[0])
