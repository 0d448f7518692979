"""Black Forest Labs' single-file layout, and ComfyUI's (the same keys behind `model.diffusion_model.`).

BFL names modules differently from diffusers and fuses some of its tensors along dim 0 (q/k/v, and more);
each family says how in one table (families/base.BflTable: renames, fused rows, a swap of row halves, norms),
and this module is that table's machinery, for every family, in both directions: reading a file into
canonical tensors (byte pieces), and planning a file from canonical tensors (element ranges). Nothing here
assumes a model's width: the fused parts are sized by the hidden size read from the file.

ComfyUI files may hold scaled fp8, in either of ComfyUI's conventions: a `scaled_fp8` marker tensor and a
`<layer>.scale_weight` per layer (older), or `<layer>.weight_scale` with a `<layer>.comfy_quant` JSON tensor
or a `_quantization_metadata` header entry (newer, which `out_tensors`' callers write). The value of such a
weight is its fp8 value times the scale: `read_scales` finds the scales and reads and checks their values
(a few bytes each, so the plan holds the very numbers), the executor multiplies.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial

from ..errors import PlanError, SourceError
from ..text import cut
from ..families.base import BflTable, Family, Mapping, Norm, Swapped, targets
from .layout import Constant, OutFile, OutTensor, Part, Piece, Scale, TensorRef, row_size, rows, stored_bytes
from .safetensors import TensorEntry, read_bytes, read_scalar

TOP_KEY = re.compile(r"^(.+)\.(weight|bias|scale)$")
QUANT_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}  # the largest finite value of each fp8 dtype
FLOAT16_MAX = 65504.0  # a scale that lets a weight's values pass this is no FLUX weight's
ZERO_CHECK_BLOCK = 16 << 20  # bytes read at a time where a scale of 0 needs its weight to be zeros
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # older and newer convention
SCALE_SUFFIX = ".weight_scale"  # the newer convention, which fp8_scaled outputs write: <layer>.weight_scale,
MARKER_SUFFIX = ".comfy_quant"  # <layer>.comfy_quant (and _quantization_metadata in the header)
SIDE_SUFFIXES = (".scale_weight", ".weight_scale", ".comfy_quant", ".scale_input", ".input_scale")


def spellings(table: BflTable, prefixes: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
    """Every name of a family's BFL layout (its ComfyUI prefixes, groups and modules) with what diffusers calls
    it (several names for a fused module, none for a prefix) and, for a block's module, the diffusers group it
    lies in: to tell a user who wrote a rule in these names the canonical ones."""
    names: list[tuple[str, tuple[str, ...], str]] = [(p, ("",), "") for p in prefixes]
    names += [(g.bfl, (g.canonical,), "") for g in table.groups]
    names += [(name, targets(m), "") for t in (table.top, table.final) for name, m in t.items()]
    return names + [(name, targets(m), g.canonical) for g in table.groups for name, m in g.table.items()]


def _segments(mapping: Mapping, sizes: list[int]) -> list[tuple[str, int, int]]:
    """(canonical module, first row, end row) of each run of the BFL tensor's rows, in the BFL tensor's
    order; `sizes`: the rows of each of the mapping's canonical tensors."""
    if isinstance(mapping, Swapped):
        half = sizes[0] // 2
        return [(mapping.target, half, sizes[0]), (mapping.target, 0, half)]
    return [(target, 0, n) for target, n in zip(targets(mapping), sizes)]


def lookup(table: BflTable, file_key: str) -> tuple[str, Mapping, str] | None:
    """BFL key -> (canonical prefix, its mapping, parameter name), or None for a key not in the table."""
    m = table.key_pattern.match(file_key)
    if m:
        group = table.group(m[1])
        mapping = group.table.get(m[3])
        return (f"{group.canonical}.{m[2]}.", mapping, m[4]) if mapping else None
    m = TOP_KEY.match(file_key)
    mapping = table.outer(m[1]) if m else None
    return ("", mapping, m[2]) if mapping else None


def _canonical_param(mapping: Mapping, param: str) -> str:
    return "weight" if isinstance(mapping, Norm) else param


def to_canonical(source: str, entries: dict[str, TensorEntry], scales: dict[str, Scale], family: Family) -> tuple[dict[str, TensorRef], list[str]]:
    """The canonical tensors of a BFL file (keys without prefix) as byte pieces; and the keys not in the
    family's table."""
    hidden = entries.get(family.bfl.hidden)
    if hidden is None or len(hidden.shape) != 2 or not all(hidden.shape):
        what = f"without '{family.bfl.hidden}'" if hidden is None else f"whose '{family.bfl.hidden}' is {list(hidden.shape)}"
        raise SourceError(f"source '{source}': {hidden.file if hidden else 'a file'} is in Black Forest Labs' layout {what}: not a whole {family.name} transformer")
    return split(source, entries, hidden.shape[0], family.name, scales, partial(lookup, family.bfl))


def split(
    source: str, entries: dict[str, TensorEntry], hidden: int, model: str, scales: dict[str, Scale] | None = None, find=None,
) -> tuple[dict[str, TensorRef], list[str]]:
    """Tensors under BFL keys -> canonical tensors as byte pieces (rows of each BFL tensor split, renamed,
    swapped as the table `find` looks up says; `hidden`: the model's hidden size, which sizes the fused
    parts; `model`: the family's name, for messages); and the keys `find` does not know. A LoRA's up
    matrices and biases split the same way as the weights they change."""
    runs: dict[str, list[tuple[int, int, Piece, str, str]]] = {}  # canonical key -> (rows, piece, where, file key)
    unknown = []
    for file_key, entry in entries.items():
        found = find(file_key)
        if found is None:
            unknown.append(file_key)
            continue
        prefix, mapping, param = found
        total = rows(entry.shape)
        sizes = [hidden] * (len(targets(mapping)) - 1)
        sizes.append(total - sum(sizes))
        if sizes[-1] <= 0 or isinstance(mapping, Swapped) and total % 2:
            raise SourceError(f"source '{source}': {entry.file}: '{cut(entry.name)}' {list(entry.shape)} cannot be split into a {model} transformer's tensors (hidden size {hidden})")
        width = row_size(entry.shape)
        at = 0  # the BFL tensor's row where this run starts
        for module, first, end in _segments(mapping, sizes):
            piece = Piece(entry.file, entry.begin + stored_bytes(entry.dtype, at * width), stored_bytes(entry.dtype, (end - first) * width))
            where = entry.name if end - first == total else f"{entry.name}[{at}:{at + end - first}]"
            runs.setdefault(f"{prefix}{module}.{_canonical_param(mapping, param)}", []).append((first, end, piece, where, file_key))
            at += end - first
    tensors = {}
    for key, parts in runs.items():
        parts.sort(key=lambda p: p[1])
        entry = entries[parts[0][4]]
        count = sum(end - first for first, end, *_ in parts)
        tensors[key] = TensorRef(
            source=source,
            key=key,
            file_key=" + ".join(p[3] for p in parts),
            dtype=entry.dtype,
            shape=(count, *entry.shape[1:]) if entry.shape else entry.shape,
            pieces=tuple(p[2] for p in parts),
            scale=(scales or {}).get(parts[0][4]),
        )
    return tensors, unknown


def out_tensors(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], prefix: str, table: BflTable) -> list[OutTensor]:
    """The tensors of a BFL (prefix '') or ComfyUI file holding these canonical tensors, in model order, as
    the family's `table` lays them out. Raises PlanError when a canonical tensor has no place in the layout,
    or a fused tensor would lack a part or mix dtypes."""
    blocks = {(m[1], int(m[2])) for k in shapes if (m := table.canonical_pattern.match(k))}
    modules: list[tuple[str, str, Mapping]] = [("", name, mapping) for name, mapping in table.outer_modules(table.top, shapes)]
    for group in table.groups:
        for index in sorted(i for g, i in blocks if g == group.canonical):
            modules += [(f"{group.canonical}.{index}.", f"{group.bfl}.{index}.{name}", mapping) for name, mapping in group.table.items()]
    modules += [("", name, mapping) for name, mapping in table.outer_modules(table.final, shapes)]
    placed: set[str] = set()
    tensors = []
    for canonical_prefix, bfl_module, mapping in modules:
        for param in ("scale",) if isinstance(mapping, Norm) else ("weight", "bias"):
            members = [f"{canonical_prefix}{t}.{_canonical_param(mapping, param)}" for t in targets(mapping)]
            present = [t for t in members if t in shapes]
            if not present:
                continue
            tensors.append(_out_tensor(f"{prefix}{bfl_module}.{param}", mapping, members, shapes, dtypes))
            placed.update(members)
    stray = [k for k in shapes if k not in placed]
    if stray:
        raise PlanError(f"the output holds {len(stray)} tensor(s) the Black Forest Labs layout has no place for (e.g. '{cut(stray[0])}')")
    return tensors


def _out_tensor(name: str, mapping: Mapping, members: list[str], shapes: dict, dtypes: dict) -> OutTensor:
    missing = [t for t in members if t not in shapes]
    if missing:
        raise PlanError(f"{name} is made of {', '.join(members)}; the output lacks {', '.join(missing)}, so it cannot be written in this layout")
    kinds = {dtypes[t] for t in members}
    if len(kinds) != 1:
        raise PlanError(f"{name} is made of {', '.join(members)}, which the recipe gives different dtypes ({', '.join(f'{dtypes[t]}' for t in members)}): a fused tensor has one dtype")
    tail = shapes[members[0]][1:]
    if any(shapes[t][1:] != tail for t in members):
        raise PlanError(f"{name} is made of {', '.join(members)}, whose shapes do not fit together ({', '.join(str(list(shapes[t])) for t in members)})")
    if isinstance(mapping, Swapped) and rows(shapes[members[0]]) % 2:
        raise PlanError(f"{name}: '{cut(members[0])}' has an odd number of rows, so its halves cannot be swapped")
    key_of = dict(zip(targets(mapping), members))
    parts, total = [], 0
    for module, first, end in _segments(mapping, [rows(shapes[t]) for t in members]):
        width = row_size(shapes[key_of[module]])
        parts.append(Part(key_of[module], first * width, end * width))
        total += end - first
    return OutTensor(name, kinds.pop(), (total, *tail), tuple(parts))


def out_file(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], scaled: set[str], file_name: str, family: Family, prefix: str = "") -> tuple[OutFile]:
    """The one file of a BFL (prefix '') or ComfyUI output: its tensors in the family's layout; the weights in
    `scaled` (canonical keys) as scaled fp8 in ComfyUI's newer convention (a scale and a marker per layer, and
    `_quantization_metadata` in the header)."""
    tensors, constants, layers = [], [], {}
    for tensor in out_tensors(shapes, dtypes, prefix, family.bfl):
        parts = {p.key for p in tensor.parts}
        if parts & scaled and not parts <= scaled:
            raise PlanError(f"{tensor.name} is made of {', '.join(sorted(parts))}, which the recipe gives fp8 and fp8_scaled: a fused tensor has one scale, so give them one dtype")
        if parts & scaled:
            layer = tensor.name[: -len(".weight")]
            tensor = OutTensor(tensor.name, tensor.dtype, tensor.shape, tensor.parts, scale_name=layer + SCALE_SUFFIX)
            marker = quant_marker(tensor.dtype)
            constants.append(Constant(layer + MARKER_SUFFIX, "U8", (len(marker),), marker))
            layers[layer] = json.loads(marker)
        tensors.append(tensor)
    metadata = (("_quantization_metadata", json.dumps({"format_version": "1.0", "layers": layers})),) if layers else ()
    return (OutFile(file_name, tuple(tensors), tuple(constants), metadata),)


# --- scaled fp8 ------------------------------------------------------------------------------------------


def read_scales(source: str, path: str, entries: dict[str, TensorEntry], metadata: dict[str, str], prefix: str = "") -> tuple[dict[str, Scale], list[str], list[str]]:
    """Scaled fp8, in either ComfyUI convention: weight key -> its Scale (its value read here: a few bytes
    each, so that the plan states and checks what the merge will multiply by); the keys that are side data
    (scales, markers, activation scales), not tensors of the model; and notes on what is odd but meant.
    Raises SourceError when a scaled layer lacks its scale or has two, a scale is not a number that can scale
    its weight, a marker contradicts the weight's dtype, or a layer is quantized in a way fluxrecipe cannot
    dequantize exactly."""
    unsupported = [k for k in entries if k.endswith((".weight_scale_2", ".pre_quant_scale"))]
    if unsupported:
        raise SourceError(f"source '{source}': {path} holds '{cut(unsupported[0])}': a quantization (NVFP4, ...) fluxrecipe cannot dequantize exactly; use a bf16, fp16, fp8 or scaled-fp8 file")
    side = [k for k in entries if k == "scaled_fp8" or k.endswith(SIDE_SUFFIXES)]
    where = f"source '{source}': {path}"
    scales: dict[str, Scale] = {}
    notes: list[str] = []
    for key in entries:
        for suffix in WEIGHT_SCALE_SUFFIXES:
            if key.endswith(suffix):
                weight = key[: -len(suffix)] + ".weight"
                if weight in scales:
                    names = sorted((entries[key].name, entries[scales[weight].file_key].name))
                    raise SourceError(f"{where}: '{cut(entries[weight].name)}' has two scales, '{cut(names[0])}' and '{cut(names[1])}': which one applies is not known")
                scales[weight] = _scale(where, entries, key, weight, notes)
    for layer, quant in _quant_formats(where, entries, metadata, prefix).items():
        if quant not in QUANT_FORMATS:
            raise SourceError(f"{where}: layer '{cut(layer)}' is quantized as {quant!r}, which fluxrecipe cannot dequantize exactly (it reads {', '.join(QUANT_FORMATS)})")
        weight = entries.get(layer + ".weight")
        if weight is not None and layer + ".weight" not in scales:
            raise SourceError(f"{where}: scaled fp8 layer '{cut(layer)}' has no '{layer}.weight_scale': the file is incomplete (its weights mean nothing without their scales)")
        if weight is not None and weight.dtype != QUANT_FORMATS[quant]:
            raise SourceError(f"{where}: layer '{cut(layer)}' is marked {quant} (its comfy_quant or _quantization_metadata) but its weight is {weight.dtype}: the file contradicts itself")
    if "scaled_fp8" in entries:
        for key, entry in entries.items():
            if key.endswith(".weight") and entry.dtype.startswith("F8") and key not in scales:
                raise SourceError(f"{where} is scaled fp8 (it has a 'scaled_fp8' marker) but '{cut(key)}' has no '{cut(key.removesuffix('weight') + 'scale_weight')}': the file is incomplete")
    return scales, side, notes


def _scale(where: str, entries: dict[str, TensorEntry], key: str, weight: str, notes: list[str]) -> Scale:
    """The scale `key` of the fp8 tensor `weight`: a finite number above 0 that keeps the weight's values
    within float16's range (no FLUX weight comes near it); 0 only for a weight of zeros (a note)."""
    entry = entries[key]
    if weight not in entries:
        raise SourceError(f"{where} holds the scale '{cut(key)}' of a weight '{cut(weight)}' it does not hold")
    if entry.numel != 1 or entry.dtype not in ("F32", "F16", "BF16"):
        raise SourceError(f"{where}: '{cut(key)}' is {entry.dtype} {list(entry.shape)}: fluxrecipe reads per-tensor scales (one number)")
    stored = entries[weight]
    if not stored.dtype.startswith("F8"):
        raise SourceError(f"{where}: '{cut(key)}' scales '{cut(weight)}', which is {stored.dtype}, not fp8")
    value = read_scalar(entry)
    if not math.isfinite(value) or value < 0:
        raise SourceError(f"{where}: '{cut(entry.name)}' is {value:g}: a scale is a finite number above 0")
    if value == 0:
        if not _all_zero(stored):
            raise SourceError(f"{where}: '{cut(entry.name)}' is 0 but '{cut(stored.name)}' holds values other than 0: they would all read as 0 (a damaged file?)")
        notes.append(f"'{cut(entry.name)}' is 0 and '{cut(stored.name)}' is all zero: it reads as zeros")
    largest = value * FP8_MAX[stored.dtype]
    if largest > FLOAT16_MAX:
        raise SourceError(
            f"{where}: '{cut(entry.name)}' is {value:g}: '{cut(stored.name)}' would hold values up to {largest:g}, beyond float16's range "
            "and any FLUX weight (a damaged file?)"
        )
    return Scale(value, key)


def _all_zero(entry: TensorEntry) -> bool:
    """Whether every value of an fp8 tensor is 0 or -0 (bytes 0x00 and 0x80), read in blocks."""
    for start in range(0, entry.nbytes, ZERO_CHECK_BLOCK):
        if read_bytes(entry, start, min(ZERO_CHECK_BLOCK, entry.nbytes - start)).translate(None, b"\x00\x80"):
            return False
    return True


def _quant_formats(where: str, entries: dict[str, TensorEntry], metadata: dict[str, str], prefix: str) -> dict[str, str]:
    """Layer -> quantization format, from `_quantization_metadata` and the `comfy_quant` markers."""
    formats: dict[str, str] = {}
    if "_quantization_metadata" in metadata:
        try:
            layers = json.loads(metadata["_quantization_metadata"])["layers"]
            formats.update({layer: str(conf.get("format") if isinstance(conf, dict) else conf) for layer, conf in layers.items()})
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise SourceError(f"{where}: _quantization_metadata is not valid ({type(e).__name__}: {e})") from None
    for key, entry in entries.items():
        if key.endswith(".comfy_quant"):
            if entry.dtype != "U8" or entry.nbytes > 4096:
                raise SourceError(f"{where}: '{cut(key)}' is not a comfy_quant marker (a few U8 bytes of JSON)")
            try:
                conf = json.loads(read_bytes(entry))
                formats[key[: -len(".comfy_quant")]] = str(conf.get("format"))
            except (ValueError, AttributeError, RecursionError) as e:
                raise SourceError(f"{where}: '{cut(key)}' is not a valid comfy_quant marker ({e})") from None
    return {layer.removeprefix(prefix): f for layer, f in formats.items()}  # `entries` are without the file's prefix


def quant_marker(dtype: str) -> bytes:
    """The JSON bytes of a `comfy_quant` marker for a scaled layer of this dtype."""
    name = next(n for n, code in QUANT_FORMATS.items() if code == dtype)
    return json.dumps({"format": name}).encode()
