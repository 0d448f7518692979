"""GGUF at the byte level (fluxrecipe/formats/gguf.py), against the gguf package and diffusers' GGUF loader.

The references: gguf's own GGUFReader and GGUFWriter (the header, both ways), `gguf.quants` on the whole
tensor (the chunked (de)quantizers), hostile headers built byte by byte here with `struct` (one line each),
an independent decoder of the legacy quant blocks written here from the block layouts, and diffusers'
`load_gguf_checkpoint` / `dequantize_gguf_tensor` (what a GGUF file is to diffusers).
"""

from __future__ import annotations

import io
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValue, GGUFWriter
from gguf import GGUFValueType as V

from fluxrecipe.errors import RecipeError, SourceError, UsageError
from fluxrecipe.formats import gguf as g

OUTPUT = [Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0, Q.BF16, Q.F16, Q.F32]
K_QUANTS = [Q.Q6_K, Q.Q5_K, Q.Q4_K]

# One KV of every value type, arrays of every item type, an array of strings and nested arrays.
KVS: dict[str, GGUFValue] = {
    "general.architecture": GGUFValue("flux", V.STRING),
    "general.quantization_version": GGUFValue(2, V.UINT32),
    "general.file_type": GGUFValue(int(gguf.LlamaFileType.MOSTLY_Q8_0), V.UINT32),
    "t.u8": GGUFValue(255, V.UINT8),
    "t.i8": GGUFValue(-128, V.INT8),
    "t.u16": GGUFValue(65535, V.UINT16),
    "t.i16": GGUFValue(-32768, V.INT16),
    "t.u32": GGUFValue(2**32 - 1, V.UINT32),
    "t.i32": GGUFValue(-(2**31), V.INT32),
    "t.f32": GGUFValue(float(np.float32(0.1)), V.FLOAT32),
    "t.bool": GGUFValue(True, V.BOOL),
    "t.u64": GGUFValue(2**64 - 1, V.UINT64),
    "t.i64": GGUFValue(-(2**63), V.INT64),
    "t.f64": GGUFValue(0.1, V.FLOAT64),
    "t.string": GGUFValue("fluxrecipe: ünïcode ✓", V.STRING),
    "t.empty": GGUFValue("", V.STRING),
    "t.recipe": GGUFValue("sources:\n  a: x.safetensors\n\tmerge: lerp:0.3\n", V.STRING),  # values may hold any text
    "t.ints": GGUFValue([1, -2, 3], V.ARRAY),  # item type from the first item: INT32
    "t.floats": GGUFValue([0.5, -1.25], V.ARRAY),
    "t.strings": GGUFValue(["a", "bé", ""], V.ARRAY),
    "t.bools": GGUFValue([True, False], V.ARRAY),
    "t.u64s": GGUFValue([1, 2**63], V.ARRAY, V.UINT64),
    "t.u8s": GGUFValue([0, 255], V.ARRAY, V.UINT8),
    "t.i16s": GGUFValue([-1, 7], V.ARRAY, V.INT16),
    "t.f64s": GGUFValue([1e300, -0.0], V.ARRAY, V.FLOAT64),
    "t.nested": GGUFValue([[1, 2], [3]], V.ARRAY),
    "comfy.gguf.orig_shape.x": GGUFValue([3, 4], V.ARRAY, V.INT32),
}


def tensors_of_every_type(rng: np.random.Generator) -> list[tuple[str, tuple[int, ...], Q, np.ndarray]]:
    """(name, shape, type, bytes) for BFL-named tensors of the output types, shapes of 1 to 3 dimensions."""
    shapes = {
        Q.Q8_0: (96, 64), Q.Q5_1: (3, 2, 64), Q.Q5_0: (33, 32), Q.Q4_1: (64, 96),
        Q.Q4_0: (16, 128), Q.BF16: (48, 24), Q.F16: (24, 40), Q.F32: (72,),
    }
    out = []
    for index, (ggml_type, shape) in enumerate(shapes.items()):
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        data = np.ascontiguousarray(gguf.quants.quantize(values, ggml_type)).view(np.uint8)
        out.append((f"double_blocks.{index}.img_attn.qkv.weight", shape, ggml_type, data))
    return out


def write_with_gguf(path, kvs: dict[str, GGUFValue], tensors, alignment: int | None = None) -> None:
    """The file gguf's own writer makes of these KVs (the architecture first, as GGUFWriter adds it) and tensors."""
    writer = GGUFWriter(path, kvs["general.architecture"].value)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, value in kvs.items():
        if key != "general.architecture":
            writer.add_key_value(key, value.value, value.type, value.sub_type)
    for name, _shape, ggml_type, data in tensors:
        writer.add_tensor(name, data, raw_shape=tuple(data.shape) if data.dtype != np.uint8 else None, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def our_kvs(alignment: int | None) -> dict[str, GGUFValue]:
    """KVS in the order write_with_gguf gives them to GGUFWriter."""
    kvs = {"general.architecture": KVS["general.architecture"]}
    if alignment:
        kvs[g.ALIGNMENT_KEY] = GGUFValue(alignment, V.UINT32)
    return kvs | {k: v for k, v in KVS.items() if k != "general.architecture"}


@pytest.mark.parametrize("alignment", [None, 64, 8])
def test_header_is_read_as_gguf_reads_it(tmp_path, alignment):
    tensors = tensors_of_every_type(np.random.default_rng(1))
    path = tmp_path / "x.gguf"
    write_with_gguf(path, KVS, tensors, alignment)
    header = g.read_header(str(path))
    reader = GGUFReader(path)

    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(fields) == list(our_kvs(alignment))
    for key, value in header.metadata.items():
        assert value.type == fields[key].types[0], key
        if value.type == V.ARRAY:
            assert value.sub_type == fields[key].types[1], key
        if key != "t.nested":  # GGUFReader flattens nested arrays; the value written is the reference there
            assert value.value == fields[key].contents(), key
    assert header.metadata["t.nested"].value == [[1, 2], [3]]
    assert header.metadata["t.strings"].value == ["a", "bé", ""]

    assert header.alignment == reader.alignment == (alignment or 32)
    assert header.data_start == reader.data_offset
    assert header.version == 3 and header.size == path.stat().st_size
    assert [t.name for t in header.tensors.values()] == [t.name for t in reader.tensors]
    for ours, theirs, (_, shape, ggml_type, data) in zip(header.tensors.values(), reader.tensors, tensors):
        assert ours.shape == shape == tuple(reversed(theirs.shape.tolist()))
        assert Q[ours.dtype] == theirs.tensor_type == ggml_type
        assert (ours.begin, ours.nbytes) == (theirs.data_offset, theirs.n_bytes) and ours.nbytes == data.nbytes
        assert path.read_bytes()[ours.begin : ours.begin + ours.nbytes] == data.tobytes()


@pytest.mark.parametrize("alignment", [None, 64, 8])
def test_encoded_header_is_byte_identical_to_gguf_writer(tmp_path, alignment):
    tensors = tensors_of_every_type(np.random.default_rng(2))
    theirs = tmp_path / "theirs.gguf"
    write_with_gguf(theirs, KVS, tensors, alignment)

    encoded = g.encode_header(str(tmp_path / "ours.gguf"), our_kvs(alignment), [(name, shape, ggml_type) for name, shape, ggml_type, _ in tensors])
    ours = bytearray(encoded.size)  # zeros: the padding
    ours[: len(encoded.data)] = encoded.data
    for entry, (name, _, _, data) in zip(encoded.tensors, tensors):
        assert entry.name == name and entry.nbytes == data.nbytes and entry.begin % (alignment or 32) == 0
        ours[entry.begin : entry.begin + entry.nbytes] = data.tobytes()
    assert bytes(ours) == theirs.read_bytes()

    # and it reads back as written: every value, and every tensor where encode_header put it
    (tmp_path / "ours.gguf").write_bytes(ours)
    header = g.read_header(str(tmp_path / "ours.gguf"))
    assert {k: (v.value, v.type) for k, v in header.metadata.items()} == {k: (v.value, v.type) for k, v in our_kvs(alignment).items()}
    assert tuple(header.tensors.values()) == encoded.tensors and header.data_start == len(encoded.data)
    assert g.encode_header(header.path, header.metadata, [(t.name, t.shape, Q[t.dtype]) for t in header.tensors.values()]) == encoded


def test_encoded_header_without_tensors_matches_gguf_writer(tmp_path):
    write_with_gguf(tmp_path / "theirs.gguf", {"general.architecture": GGUFValue("flux", V.STRING)}, [])
    assert g.encode_header("ours.gguf", {"general.architecture": GGUFValue("flux", V.STRING)}, []).data == (tmp_path / "theirs.gguf").read_bytes()


def test_header_reading_never_reads_tensor_data(tmp_path):
    path = tmp_path / "x.gguf"
    write_with_gguf(path, KVS, tensors_of_every_type(np.random.default_rng(3)))

    class Counting:
        def __init__(self, f):
            self.f, self.read_to = f, 0

        def read(self, n):
            data = self.f.read(n)
            self.read_to = max(self.read_to, self.f.tell())
            return data

        def seek(self, n, whence):
            return self.f.seek(n, whence)

    with open(path, "rb") as f:
        counting = Counting(f)
        header = g.parse_header(str(path), counting, path.stat().st_size)
    assert counting.read_to <= header.data_start < min(t.begin for t in header.tensors.values()) + 1


# ---------------------------------------------------------------------------------------------- hostile files


def text(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def kv(key: bytes, value_type: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", value_type) + payload


def info(name: bytes, dims, ggml_type: int, offset: int) -> bytes:
    return text(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ggml_type, offset)


def raw_gguf(kvs=(), infos=(), data=b"", n_kvs=None, n_tensors=None, version=3, magic=b"GGUF", alignment=32) -> bytes:
    """A GGUF file built by hand: the header fields as given, padded to `alignment`, then `data`."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kvs is None else n_kvs)
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


F32_128 = bytes(128)  # the data of one F32 tensor of 32 elements
ARCH = kv(b"general.architecture", V.STRING, text(b"flux"))
NESTED_TOO_DEEP = kv(b"deep", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) + struct.pack("<IQ", V.ARRAY, 1) * 4 + struct.pack("<IQ", V.UINT8, 1) + b"\0")

HOSTILE = {
    "wrong magic": (raw_gguf(magic=b"GGML"), "not a GGUF file"),
    "version 1": (raw_gguf(version=1), "GGUF version 1"),
    "version 4": (raw_gguf(version=4), "GGUF version 4"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "empty": (b"", "the magic number runs past the end"),
    "too many tensors": (raw_gguf(n_tensors=2**40), "claims 1099511627776 tensors"),
    "counts past the end": (raw_gguf(n_kvs=1000), "1000 metadata keys runs past the end"),
    "string past the end": (raw_gguf([kv(b"k", V.STRING, struct.pack("<Q", 2**62))]), "metadata 'k' runs past the end"),
    "array past the end": (raw_gguf([kv(b"k", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**61))]), "metadata 'k' (2305843009213693952 items) runs past the end"),
    "unknown value type": (raw_gguf([kv(b"k", 13, b"\0" * 8)]), "metadata 'k' has unknown value type 13"),
    "unknown item type": (raw_gguf([kv(b"k", V.ARRAY, struct.pack("<IQ", 99, 1))]), "metadata 'k' (its items) has unknown value type 99"),
    "nested too deep": (raw_gguf([NESTED_TOO_DEEP]), "metadata 'deep' nests arrays deeper than 4"),
    "duplicate key": (raw_gguf([ARCH, ARCH]), "metadata key 'general.architecture' is given twice"),
    "key not UTF-8": (raw_gguf([kv(b"\xff\xfe", V.UINT8, b"\0")]), "metadata key #0 is not UTF-8"),
    "value not UTF-8": (raw_gguf([kv(b"k", V.STRING, text(b"\xc3("))]), "metadata 'k' is not UTF-8"),
    "alignment not a power of two": (raw_gguf([kv(b"general.alignment", V.UINT32, struct.pack("<I", 48))]), "'general.alignment' must be a power of two"),
    "alignment zero": (raw_gguf([kv(b"general.alignment", V.UINT32, struct.pack("<I", 0))]), "'general.alignment' must be a power of two"),
    "alignment as UINT64": (raw_gguf([kv(b"general.alignment", V.UINT64, struct.pack("<Q", 64))]), "stored as UINT32, not UINT64 64"),
    "name not UTF-8": (raw_gguf(infos=[info(b"img_in.\xff", [32], Q.F32, 0)], data=F32_128), "the name of tensor #0 is not UTF-8"),
    "key with a newline": (raw_gguf([kv(b"general.\nname", V.UINT8, b"\0")]), "metadata key #0 'general.\\nname' holds unprintable"),
    "unprintable name": (raw_gguf(infos=[info(b"img_in\x1b[2J", [32], Q.F32, 0)], data=F32_128), "holds unprintable characters"),
    "five dimensions": (raw_gguf(infos=[info(b"w", [1, 1, 1, 1, 32], Q.F32, 0)], data=F32_128), "tensor 'w' has 5 dimensions"),
    "unknown type": (raw_gguf(infos=[info(b"w", [32], 99, 0)], data=F32_128), "tensor 'w': unknown ggml type 99"),
    "removed type Q4_2": (raw_gguf(infos=[info(b"w", [32], 4, 0)], data=F32_128), "tensor 'w': unknown ggml type 4"),
    "absurd shape": (raw_gguf(infos=[info(b"w", [2**63, 2**63, 2**63, 2**63], Q.F32, 0)], data=F32_128), "tensor 'w': shape"),
    "large shape": (raw_gguf(infos=[info(b"w", [64, 64], Q.F32, 0)], data=F32_128), "tensor 'w': F32 [64, 64] needs 16384 bytes"),
    "data past the end": (raw_gguf(infos=[info(b"w", [32], Q.F32, 2**40)], data=F32_128), "past the end of the file"),
    "offset not aligned": (raw_gguf(infos=[info(b"w", [16], Q.F32, 4)], data=F32_128), "data offset 4 is not a multiple of the file's alignment (32)"),
    "rows not whole blocks": (raw_gguf(infos=[info(b"w", [16, 2], Q.Q8_0, 0)], data=F32_128), "rows of 16 elements are not whole Q8_0 blocks of 32"),
    "duplicate tensor": (raw_gguf(infos=[info(b"w", [8], Q.F32, 0), info(b"w", [8], Q.F32, 32)], data=F32_128), "tensor 'w' is given twice"),
    "overlapping tensors": (raw_gguf(infos=[info(b"a", [32], Q.F32, 0), info(b"b", [8], Q.F32, 96)], data=F32_128), "tensors 'a' and 'b' overlap"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_bad_header_is_one_line_naming_the_file(tmp_path, case):
    raw, expected = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(SourceError) as caught:
        g.read_header(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_the_hand_built_files_are_valid_where_not_broken(tmp_path):
    """The builder above makes files both readers accept, so each hostile case fails for its one defect."""
    path = tmp_path / "good.gguf"
    path.write_bytes(raw_gguf([ARCH], [info(b"a", [8], Q.F32, 0), info(b"b", [8, 2], Q.F32, 32)], data=F32_128 + bytes(64)))
    header = g.read_header(str(path))
    assert [(t.name, t.shape, t.begin - header.data_start, t.nbytes) for t in header.tensors.values()] == [("a", (8,), 0, 32), ("b", (2, 8), 32, 64)]
    assert [(t.name, t.data_offset) for t in GGUFReader(path).tensors] == [("a", header.data_start), ("b", header.data_start + 32)]


def test_every_truncation_is_one_line(tmp_path):
    """Cut anywhere in the header, or inside any tensor's data: one line; cut after the last tensor's data
    (before gguf's padding): the same header."""
    full = tmp_path / "full.gguf"
    write_with_gguf(full, KVS, tensors_of_every_type(np.random.default_rng(4)))
    raw = full.read_bytes()
    header = g.read_header(str(full))
    data_end = max(t.begin + t.nbytes for t in header.tensors.values())
    cuts = [*range(header.data_start + 1), *(t.begin + t.nbytes - 1 for t in header.tensors.values())]
    for cut in cuts:
        with pytest.raises(SourceError, match=r"^cut\.gguf: .*(truncated|runs past the end)") as caught:
            g.parse_header("cut.gguf", io.BytesIO(raw[:cut]), cut)
        assert "\n" not in str(caught.value)
    assert g.parse_header(str(full), io.BytesIO(raw[:data_end]), data_end).tensors == header.tensors


def test_header_bigger_than_the_bound_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.gguf"
    path.write_bytes(raw_gguf([kv(b"general.description", V.STRING, text(b"x" * 5000))]))
    assert g.read_header(str(path)).metadata["general.description"].value == "x" * 5000
    monkeypatch.setattr(g, "MAX_HEADER_BYTES", 4096)
    with pytest.raises(SourceError, match="metadata 'general.description' runs past the first 0 MiB, more header than fluxrecipe reads"):
        g.read_header(str(path))


def test_long_arrays_are_walked_over_not_kept(tmp_path, monkeypatch):
    """Past the decoding budget an array becomes UndecodedArray, and what follows it is still read right."""
    monkeypatch.setattr(g, "MAX_DECODED_ITEMS", 10)
    strings = b"".join(text(b"tok%d" % i) for i in range(20))
    kvs = [
        kv(b"kept", V.ARRAY, struct.pack("<IQ", V.INT32, 3) + struct.pack("<3i", 1, 2, 3)),
        kv(b"tokens", V.ARRAY, struct.pack("<IQ", V.STRING, 20) + strings),
        kv(b"scores", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 20) + bytes(80)),
        kv(b"nested", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2) + (struct.pack("<IQ", V.UINT8, 3) + b"abc") * 2),
        kv(b"last", V.ARRAY, struct.pack("<IQ", V.UINT16, 2) + struct.pack("<2H", 7, 8)),
    ]
    path = tmp_path / "llm.gguf"
    path.write_bytes(raw_gguf(kvs, [info(b"w", [8], Q.F32, 0)], data=bytes(32)))
    header = g.read_header(str(path))
    assert {k: v.value for k, v in header.metadata.items()} == {
        "kept": [1, 2, 3],
        "tokens": g.UndecodedArray(V.STRING, 20),
        "scores": g.UndecodedArray(V.FLOAT32, 20),
        "nested": g.UndecodedArray(V.ARRAY, 2),  # 2 + 3 + 3 items, past the 7 left: kept whole or not at all
        "last": [7, 8],  # within the 2 items left
    }
    assert header.tensors["w"].shape == (8,) and header.tensors["w"].begin == header.data_start
    assert [t.name for t in GGUFReader(path).tensors] == ["w"]


# ---------------------------------------------------------------------------------------------- quantization


def awkward(rows: int, row_length: int, seed: int) -> np.ndarray:
    """float32 rows meant to break chunked quantization: zero rows and blocks, huge and tiny magnitudes,
    values on rounding ties of every legacy type, a single non-zero per block, negative maxima."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, row_length)) * 0.02).astype(np.float32)
    x[0] = 0
    x[1, :32] = 0
    x[2] *= 1e4
    x[3] *= 1e-30  # scales that underflow float16
    x[4] = np.resize(np.arange(-16, 16, dtype=np.float32) + 0.5, row_length)  # ties of round(x / d)
    x[5] = np.resize(np.arange(32, dtype=np.float32) * (127 / 31), row_length)
    x[6] = 0
    x[6, 7::32] = -3.0
    x[7] = -np.abs(x[7])
    x[8] = np.resize(np.float32([1, -1]), row_length) * np.float32(65504)
    return x


@pytest.mark.parametrize("ggml_type", OUTPUT, ids=lambda t: t.name)
def test_quantize_in_chunks_equals_gguf_on_the_whole_tensor(ggml_type):
    x = awkward(41, 256, seed=int(ggml_type))
    whole = np.ascontiguousarray(gguf.quants.quantize(x, ggml_type)).view(np.uint8)
    bounds = [0, 1, 6, 19, 20, 41]  # chunks of whole rows, uneven
    by_rows = np.concatenate([g.quantize_chunk(x[a:b], ggml_type) for a, b in zip(bounds, bounds[1:])])
    assert by_rows.shape == whole.shape and by_rows.tobytes() == whole.tobytes()

    block = gguf.GGML_QUANT_SIZES[ggml_type][0]
    flat = x.reshape(-1)
    cuts = [0, 3 * block, 11 * block, 11 * block, flat.size - block, flat.size]  # whole blocks across rows
    by_blocks = b"".join(g.quantize_chunk(flat[a:b], ggml_type).tobytes() for a, b in zip(cuts, cuts[1:]))
    assert by_blocks == whole.tobytes()
    assert g.quantize_chunk(torch.from_numpy(x[6:19]), ggml_type).tobytes() == whole[6:19].tobytes()
    assert g.tensor_nbytes(x.shape, ggml_type) == whole.nbytes


def independent_dequantize(blocks: np.ndarray, ggml_type: Q, dtype=np.float32) -> np.ndarray:
    """Legacy quant blocks decoded from their layouts (ggml's block_q8_0, block_q4_0, ...), the arithmetic done
    in `dtype`: float32 as ggml does, float16 as diffusers' dequantizers do."""
    type_size = gguf.GGML_QUANT_SIZES[ggml_type][1]
    blocks = blocks.reshape(-1, type_size)
    half = lambda column: blocks[:, column : column + 2].copy().view(np.float16).astype(dtype)  # noqa: E731
    if ggml_type == Q.Q8_0:
        return (half(0) * blocks[:, 2:].view(np.int8).astype(dtype)).reshape(-1)
    with_min = ggml_type in (Q.Q4_1, Q.Q5_1)
    nibbles = blocks[:, type_size - 16 :]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int32)
    if ggml_type in (Q.Q5_0, Q.Q5_1):
        high = blocks[:, 4 if with_min else 2 :][:, :4].copy().view("<u4")
        q |= ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
    if with_min:
        return (half(0) * q.astype(dtype) + half(2)).reshape(-1)
    return (half(0) * (q - (16 if ggml_type == Q.Q5_0 else 8)).astype(dtype)).reshape(-1)


@pytest.mark.parametrize("ggml_type", sorted(g.readable_types()), ids=lambda t: t.name)
def test_dequantize_in_chunks_equals_gguf_on_the_whole_tensor(ggml_type):
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    rows, blocks_per_row = 12, 3
    rng = np.random.default_rng(int(ggml_type))
    if ggml_type in g.quantizable_types():
        data = np.ascontiguousarray(gguf.quants.quantize(awkward(rows, blocks_per_row * block_size, 5), ggml_type)).view(np.uint8)
    else:  # any bytes are blocks of a K- or I-quant: float16 scales included, so NaN and inf too (compared as bits)
        data = rng.integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    with np.errstate(all="ignore"):  # random scales: NaN and inf on purpose
        whole = gguf.quants.dequantize(data, ggml_type).reshape(-1).view(np.uint32)
    flat = data.reshape(-1)
    cuts = [0, type_size, 4 * type_size, 4 * type_size, 10 * type_size, flat.size]
    chunks = [g.dequantize_chunk(flat[a:b], ggml_type) for a, b in zip(cuts, cuts[1:])]
    assert np.concatenate(chunks).view(np.uint32).tobytes() == whole.tobytes()
    assert g.dequantize_chunk(flat[: 2 * type_size].tobytes(), ggml_type).view(np.uint32).tobytes() == whole[: 2 * block_size].tobytes()
    assert all(c.flags.writeable and c.dtype == np.float32 for c in chunks)
    if ggml_type in (Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0):
        assert independent_dequantize(data, ggml_type).view(np.uint32).tobytes() == whole.tobytes()


def test_a_chunk_of_part_of_a_block_is_refused():
    with pytest.raises(ValueError, match="not whole Q8_0 blocks"):
        g.dequantize_chunk(bytes(35), Q.Q8_0)
    with pytest.raises(ValueError, match="rows of 48 elements are not whole Q4_0 blocks of 32"):
        g.quantize_chunk(np.zeros(48, np.float32), Q.Q4_0)


def test_output_types_and_the_k_quant_refusal():
    assert g.OUTPUT_TYPES == tuple(OUTPUT) and g.DEFAULT_OUTPUT_TYPE == Q.Q8_0
    assert set(OUTPUT) <= g.quantizable_types()
    # gguf quantizes no K-quant; if it ever does, check it against ggml before offering it here
    assert not set(K_QUANTS) & g.quantizable_types() and set(K_QUANTS) <= g.readable_types()
    assert g.output_type("Q8_0", "gguf_type") == Q.Q8_0 and g.output_type("q4_1", "dtype", RecipeError) == Q.Q4_1
    assert g.output_type("bf16", "dtype", RecipeError) == Q.BF16
    offered = "GGUF outputs are Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, BF16, F16, F32"
    for name in ("Q4_K", "q6_k", "Q5_K"):
        with pytest.raises(UsageError, match=f"^gguf_type={name} is not offered: the gguf package cannot quantize {name.upper()} bit-exactly as ggml does; {offered}$"):
            g.output_type(name, "gguf_type")
    with pytest.raises(RecipeError, match=f"^recipe.yaml:3: dtype=fp8 is not offered; {offered}$"):
        g.output_type("fp8", "recipe.yaml:3: dtype", RecipeError)
    with pytest.raises(UsageError, match="gguf_type=TQ1_0 is not offered: TQ1_0 is not a type fluxrecipe writes"):
        g.output_type("TQ1_0", "gguf_type")
    assert {t: g.FILE_TYPES[t].name for t in (Q.Q8_0, Q.Q4_0, Q.BF16, Q.F32)} == {Q.Q8_0: "MOSTLY_Q8_0", Q.Q4_0: "MOSTLY_Q4_0", Q.BF16: "MOSTLY_BF16", Q.F32: "ALL_F32"}
    assert set(g.FILE_TYPES) == set(OUTPUT)


def convert_py_type(shape: tuple[int, ...], wanted: Q) -> Q:
    """ComfyUI-GGUF's tools/convert.py (lines 273-285): 1-D tensors and tensors of <= 1024 elements in F32;
    and a block type only for rows of whole blocks (else its llama.cpp patch falls back, here to BF16)."""
    numel = int(np.prod(shape))
    if len(shape) == 1 or numel <= 1024:
        return Q.F32
    return wanted if shape[-1] % gguf.GGML_QUANT_SIZES[wanted][0] == 0 else Q.BF16


@pytest.mark.parametrize("shape", [(3072,), (1024, 1), (32, 32), (33, 32), (3072, 64), (64, 3072), (3072, 48), (2, 3, 256), (18432, 3072)])
@pytest.mark.parametrize("wanted", OUTPUT, ids=lambda t: t.name)
def test_storage_type_follows_comfyui_gguf_convert(shape, wanted):
    assert g.storage_type(shape, wanted) == convert_py_type(shape, wanted)


# ---------------------------------------------------------------------------------------------- diffusers


@pytest.mark.diffusers
def test_diffusers_reads_the_bytes_and_dequantizes_them_as_documented(tmp_path):
    """diffusers' load_gguf_checkpoint on a file of BFL-named tensors of every output type: F32 and F16 come
    back as plain tensors (F16 as stored), every other type as a GGUFParameter holding the file's bytes; its
    dequantizer gives our values for BF16, and for the legacy quants the block arithmetic done in float16,
    so Q8_0, Q5_0 and Q4_0 are our values rounded to float16 once."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    tensors = tensors_of_every_type(np.random.default_rng(6))
    path = tmp_path / "flux.gguf"
    write_with_gguf(path, KVS, tensors)
    header = g.read_header(str(path))
    loaded = load_gguf_checkpoint(str(path))
    assert list(loaded) == list(header.tensors)
    raw = path.read_bytes()
    for entry in header.tensors.values():
        stored = raw[entry.begin : entry.begin + entry.nbytes]
        ours = torch.from_numpy(g.dequantize_chunk(stored, Q[entry.dtype])).reshape(entry.shape)
        theirs = loaded[entry.name]
        if Q[entry.dtype] in (Q.F32, Q.F16):
            assert not isinstance(theirs, GGUFParameter) and theirs.shape == entry.shape
            assert torch.equal(theirs.float(), ours)
            continue
        assert isinstance(theirs, GGUFParameter) and theirs.quant_type == Q[entry.dtype]
        assert theirs.quant_shape == entry.shape and theirs.numpy().tobytes() == stored
        dequantized = dequantize_gguf_tensor(theirs)
        if Q[entry.dtype] == Q.BF16:
            assert dequantized.dtype == torch.float32 and torch.equal(dequantized, ours)
            continue
        assert dequantized.dtype == torch.float16
        in_half = independent_dequantize(np.frombuffer(stored, np.uint8), Q[entry.dtype], np.float16).reshape(entry.shape)
        assert torch.equal(dequantized, torch.from_numpy(in_half))
        if Q[entry.dtype] in (Q.Q8_0, Q.Q5_0, Q.Q4_0):
            assert torch.equal(dequantized, ours.half())
