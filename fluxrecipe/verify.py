"""What `fluxrecipe verify FOLDER` checks (cli/commands.py prints it): a model folder, before trusting it.

Every problem is one line naming the file (and the key) at fault; the exit status is 0 when there is none, 1
otherwise. What is checked:
- the manifest (fluxrecipe.manifest.json, written with every merge): each file it lists is there with that
  size and sha256, and nothing stands in the folder that it does not list (a folder without a manifest, such
  as a hub download, is checked without it: this is said, not counted as a problem);
- no file that could run code when loaded (a pickle: .bin, .ckpt, .pt, ...; a script) is in the folder;
- every tensor's values are finite (no NaN or Inf), read in the same pass as the sha256;
- the index: every shard it names exists and holds the keys it assigns to it, every shard in the folder is
  named, every key of every shard is in the index for that shard, and total_size is the sum of the tensors;
- every shard's safetensors header: it parses (formats.safetensors.read_header checks dtypes, shapes and offsets) and
  its tensors fill the data area back to back, from its first byte to its last;
- config.json: diffusers' model class builds exactly the keys and shapes the shards hold, no more, no fewer
  (a key a config needs but no shard holds is what diffusers fills with random weights, warning only).
`--no-hash` skips reading the data (sha256 and values; sizes are still compared): seconds instead of minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import FluxRecipeError
from .files import read_small
from .formats.diffusers import INDEX_NAME, WEIGHTS_NAME as DIFFUSERS_WEIGHTS
from .formats.lora import module_problems
from .formats import gguf_model
from .formats.gguf import BLOCK_TYPES, dequantize_chunk, read_header as read_gguf_header
from .formats.layout import stored_bytes
from .formats.safetensors import Header, read_header
from .text import cut, some_keys
from .package import RECIPE_NAME
from .writer import MANIFEST_NAME

BLOCK = 16 << 20  # bytes read at a time for the sha256
SHOWN = 6  # how many keys a message lists before it says "and N more"
# Files that can run code when they are loaded (pickles) or run: fluxrecipe never writes one.
CODE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".npy", ".npz", ".joblib", ".py", ".sh", ".bat", ".ps1", ".exe", ".so", ".dll")
# dtype -> (unsigned view, exponent mask): a value is NaN or Inf where all its exponent bits are set (float8
# e4m3fn has no Inf, and its NaN also has all mantissa bits set).
NONFINITE_BITS = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
    "F8_E4M3": (np.uint8, 0x7F),
    "F8_E5M2": (np.uint8, 0x7C),
}


@dataclass
class Report:
    folder: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0  # checked against the manifest
    shards: int = 0
    tensors: int = 0
    model: str | None = None  # the config's model class, when it was checked
    manifest: bool = True  # the folder has a fluxrecipe manifest (a hub download has none)
    digests: dict[str, str] = field(default_factory=dict)  # file name -> sha256, of the files read

    def add(self, path: Path | str, text: str) -> None:
        self.problems.append(f"{path}: {text}")


def verify_folder(folder: Path, hash_files: bool = True) -> Report:
    """Every problem of `folder`, each a message naming its file (and key)."""
    folder = folder.expanduser()
    if not folder.is_dir():
        return Report(folder, [f"{folder}: " + ("not a folder (verify checks a model folder)" if folder.exists() else "no such folder")])
    if not (folder / MANIFEST_NAME).exists() and not list(folder.glob("*.safetensors")) and (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a pipeline folder
    report = Report(folder, manifest=(folder / MANIFEST_NAME).exists())
    if report.manifest and _weights_deleted(folder):
        report.add(folder, f"its weights were deleted or never written (keep_weights=false); its recipe.yaml rebuilds them byte for byte: `fluxrecipe recipe={folder / RECIPE_NAME} output=DIR`, then verify DIR")
        return report
    _check_manifest(folder, report, hash_files)
    _check_code_files(folder, report)
    keys = _check_shards(folder, report, hash_files)
    if keys is not None:
        _check_config(folder, keys, report)
    return report


def _weights_deleted(folder: Path) -> bool:
    """Whether the folder is a merge whose weight files (and index) alone are gone, as keep_weights=false leaves it."""
    try:
        listed = json.loads(read_small(folder / MANIFEST_NAME))["files"]
        weights = [name for name in listed if name.endswith(".safetensors") or name == INDEX_NAME]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # a damaged manifest is reported as such
    return bool(weights) and (folder / RECIPE_NAME).is_file() and not any((folder / name).exists() for name in weights) and not list(folder.glob("*.safetensors"))


def _check_code_files(folder: Path, report: Report) -> None:
    for file in sorted(folder.iterdir()):
        if file.name.lower().endswith(CODE_SUFFIXES):
            report.add(file, "a file that can run code when it is loaded (a pickle) or run (a script): neither fluxrecipe nor a diffusers safetensors model has one; remove it")


def _check_manifest(folder: Path, report: Report, hash_files: bool) -> None:
    path = folder / MANIFEST_NAME
    if not report.manifest:
        return
    listed = _json_field(path, "files", dict, report, "manifest: 'files' must map file names to {size, sha256}")
    if listed is None:
        return
    for name, record in listed.items():
        if not _plain_name(name):
            report.add(path, f"lists {cut(name)!r}, which is not a file name in this folder")
            continue
        file = folder / name
        if not file.is_file():
            report.add(file, "missing (the manifest lists it)")
            continue
        size = file.stat().st_size
        if size != record.get("size"):
            report.add(file, f"{size} bytes, the manifest says {record.get('size')}: the file was truncated or changed after the merge")
            continue
        if hash_files:
            digest = _read_checked(file, report)
            if digest != record.get("sha256"):
                report.add(file, f"sha256 {digest} differs from the manifest's {record.get('sha256')}: the file changed after the merge")
                continue
        report.files += 1
    for file in sorted(folder.iterdir()):
        if file.name not in listed and file.name != MANIFEST_NAME and not file.name.startswith(".") and not file.name.lower().endswith(CODE_SUFFIXES):
            report.add(file, "not listed in the manifest: added or renamed after the merge")


def _json_field(path: Path, field: str, value_type: type, report: Report, what: str) -> dict | None:
    """The mapping `field` of JSON file `path`, its values all of `value_type`; else None, the problem reported."""
    try:
        value = json.loads(read_small(path))[field]
    except OSError as e:
        report.add(path, e.strerror or str(e))
        return None
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        report.add(path, f"not a valid {what.split(':')[0]} ({type(e).__name__}: {e})")
        return None
    if not isinstance(value, dict) or not all(isinstance(v, value_type) for v in value.values()):
        report.add(path, f"not a valid {what}")
        return None
    return value


def _read_checked(path: Path, report: Report, header: Header | None = None) -> str:
    """Read a file once: its sha256 (returned and kept), and for a safetensors file the values of its tensors
    (each tensor with NaN or Inf is a problem)."""
    if header is None and path.name.endswith(".safetensors"):
        try:
            header = read_header(str(path))
        except FluxRecipeError:
            header = None  # the shard check reports it
    digest, nonfinite = _read(path, header)
    report.digests[path.name] = digest
    for key, count in nonfinite.items():
        report.add(path, f"tensor '{cut(key)}' holds {count} NaN/Inf value(s): the model would compute NaN")
    return digest


def _read(path: Path, header: Header | None = None, offset: int = 0) -> tuple[str, dict[str, int]]:
    """The sha256 of the file from `offset` on and, given its header, the count of NaN/Inf values of each
    tensor that has some: one pass over the file, without filling the page cache. A block boundary may cut an
    element; its bytes wait for the next block."""
    digest = hashlib.sha256()
    floats = (e for e in header.entries.values() if e.nbytes and (e.dtype in NONFINITE_BITS or e.dtype in BLOCK_TYPES)) if header else ()  # not U8 markers
    entries = sorted(floats, key=lambda e: e.begin)
    nonfinite: dict[str, int] = {}
    carry: dict[str, bytes] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        while chunk := os.pread(fd, BLOCK, offset):
            digest.update(chunk)
            end = offset + len(chunk)
            for e in entries:
                lo, hi = max(e.begin, offset), min(e.begin + e.nbytes, end)
                if lo >= hi:
                    continue
                piece = carry.pop(e.name, b"") + chunk[lo - offset : hi - offset]
                whole = len(piece) - len(piece) % stored_bytes(e.dtype, BLOCK_TYPES.get(e.dtype, (1,))[0])
                carry[e.name] = piece[whole:]
                bad = _nonfinite(piece[:whole], e.dtype)
                if bad:
                    nonfinite[e.name] = nonfinite.get(e.name, 0) + bad
            os.posix_fadvise(fd, offset, len(chunk), os.POSIX_FADV_DONTNEED)  # a 24 GB check need not fill the page cache
            offset = end
    finally:
        os.close(fd)
    return digest.hexdigest(), nonfinite


def _nonfinite(data: bytes, dtype: str) -> int:
    """NaN/Inf values in whole elements (whole blocks of a GGUF block type, dequantized) of `dtype`."""
    if dtype in BLOCK_TYPES:
        return int(np.count_nonzero(~np.isfinite(dequantize_chunk(data, GGMLQuantizationType[dtype]))))
    unsigned, mask = NONFINITE_BITS[dtype]
    return int(np.count_nonzero(np.frombuffer(data, dtype=unsigned) & unsigned(mask) == unsigned(mask)))


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_shards(folder: Path, report: Report, read_values: bool) -> dict[str, tuple[int, ...]] | None:
    """Index and headers; the keys and shapes the shards hold, or None when the shards cannot be read."""
    assigned = _weight_map(folder, report)
    if assigned is None:
        return None
    owner = {key: shard for shard, wanted in assigned.items() for key in wanted}
    keys: dict[str, tuple[int, ...]] = {}
    index = folder / INDEX_NAME
    total = 0
    readable = True
    for shard, wanted in assigned.items():
        path = folder / shard
        if not path.is_file():
            report.add(index, f"names shard '{cut(shard)}' (for {some_keys(wanted)}), which does not exist")
            readable = False
            continue
        try:
            header = read_header(str(path))
        except FluxRecipeError as e:
            report.problems.append(str(e))
            readable = False
            continue
        report.shards += 1
        _check_layout(header, report)
        if read_values and shard not in report.digests:
            _read_checked(path, report, header)
        for key in wanted:
            if key not in header.entries:
                report.add(path, f"lacks '{cut(key)}', which the index assigns to it")
                readable = False
        for key, entry in header.entries.items():
            if owner.get(key) != shard:
                elsewhere = f"the index assigns it to '{cut(owner[key])}'" if key in owner else "the index does not list it"
                report.add(path, f"holds '{cut(key)}', but {elsewhere}")
                continue
            keys[key] = entry.shape
            total += entry.nbytes
    report.tensors = len(keys)
    declared = _total_size(index)
    if readable and index.is_file() and not (isinstance(declared, int) and not isinstance(declared, bool)):
        report.add(index, f"metadata.total_size is {json.dumps(declared)}, not a number of bytes (the shards hold {total})")
    elif readable and declared is not None and declared != total:
        report.add(index, f"metadata.total_size is {declared}, the shards hold {total} bytes of tensors")
    return keys if readable else None


def _weight_map(folder: Path, report: Report) -> dict[str, list[str]] | None:
    """Shard file name -> the keys the index assigns to it (a lone unindexed file: all of its keys)."""
    index = folder / INDEX_NAME
    shards = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if not index.exists():
        if shards == [DIFFUSERS_WEIGHTS]:
            try:
                return {DIFFUSERS_WEIGHTS: list(read_header(str(folder / DIFFUSERS_WEIGHTS)).entries)}
            except FluxRecipeError as e:
                report.problems.append(str(e))
                return None
        report.add(index, "missing: " + ("the folder holds no .safetensors file" if not shards else f"nothing says which of {len(shards)} shards holds which key"))
        return None
    weight_map = _json_field(index, "weight_map", str, report, "safetensors index: 'weight_map' must map keys to shard file names")
    if weight_map is None:
        return None
    assigned: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not _plain_name(shard):
            report.add(index, f"names shard {cut(shard)!r} for '{cut(key)}', which is not a file name in this folder")
            return None
        assigned.setdefault(shard, []).append(key)
    for shard in shards:
        if shard not in assigned:
            report.add(folder / shard, "is not named by the index: a stray shard (from another merge?)")
    return assigned


def _total_size(index: Path) -> object:
    try:
        return json.loads(read_small(index)).get("metadata", {}).get("total_size")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None


def _check_layout(header: Header, report: Report | FileReport, alignment: int = 1) -> None:
    """The tensors fill the data area back to back (in a GGUF file, each from the next multiple of its
    `alignment`, as ggml lays them out): no gap, nothing after the last one (overlaps: read_header)."""
    position = header.data_start
    for entry in sorted(header.entries.values(), key=lambda e: (e.begin, e.nbytes)):
        position = -(-position // alignment) * alignment
        if entry.begin != position:
            report.add(header.path, f"tensor '{cut(entry.name)}' starts at byte {entry.begin}, {entry.begin - position} bytes after the previous one ends: a gap in the data")
        position = entry.begin + entry.nbytes
    if -(-position // alignment) * alignment != header.size:
        report.add(header.path, f"{header.size - position} bytes follow the last tensor's data: the file is not what its header describes")


def _check_config(folder: Path, keys: dict[str, tuple[int, ...]], report: Report) -> None:
    from .architecture import expected_parameters, mismatch

    path = folder / "config.json"
    try:
        config = json.loads(read_small(path))
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
    except FileNotFoundError:
        report.add(path, "missing: diffusers cannot load the folder without it")
        return
    except OSError as e:
        report.add(path, e.strerror or str(e))
        return
    except (ValueError, TypeError, RecursionError) as e:
        report.add(path, f"not a valid config ({type(e).__name__}: {e})")
        return
    try:
        expected = expected_parameters(config, str(path))
    except FluxRecipeError as e:
        report.problems.append(str(e))
        return
    report.model = str(config.get("_class_name"))
    found = mismatch(expected, keys)
    missing, unexpected, wrong = found.missing, found.unexpected, found.wrong
    if missing:
        report.add(path, f"{report.model} needs {len(missing)} key(s) that no shard holds ({some_keys(missing)}): diffusers would fill them with random weights")
    if unexpected:
        report.add(path, f"{report.model} has no place for {len(unexpected)} key(s) the shards hold ({some_keys(unexpected)})")
    for k in wrong[:SHOWN]:
        report.add(path, f"'{cut(k)}' is {list(keys[k])} in the shards, {report.model} needs {list(expected[k])}")
    if len(wrong) > SHOWN:
        report.add(path, f"and {len(wrong) - SHOWN} more key(s) of the wrong shape")


# --- a single file (format=bfl or comfyui) -------------------------------------------------------------------


@dataclass
class FileReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    tensors: int = 0
    layout: str | None = None
    family: str | None = None

    def add(self, path: Path | str, text: str) -> None:
        self.problems.append(f"{path}: {text}")


def verify_file(path: Path, hash_data: bool = True) -> FileReport:
    """Every problem of a single-file output: its header and data layout, its keys against the architecture
    they imply (its family's, in its layout, scaled fp8 included), and the sha256 of its data against the
    one fluxrecipe wrote into its metadata."""
    from .architecture import expected_parameters, mismatch
    from .families import ShapeError
    from .formats import recognise

    report = FileReport(path)
    try:
        gguf_file = path.suffix == ".gguf" or gguf_model.is_gguf(str(path))
        header = gguf_model.source_header(str(path)) if gguf_file else read_header(str(path))
        report.tensors = len(header.entries)
        _check_layout(header, report, read_gguf_header(str(path)).alignment if gguf_file else 1)
        lora_problems = module_problems(header.entries)
        if lora_problems is not None:  # a merge written as a LoRA (format=lora, lora_peft): its modules, its data
            report.layout = "lora"
            for problem in lora_problems:
                report.add(path, problem)
            _check_data(path, header, report, hash_data)
            return report
        found = recognise("file", str(path), header.entries, header.metadata)
        report.layout, report.family = found.layout, found.family.name
        config, _ = found.family.derive_config({k: t.shape for k, t in found.tensors.items()}, None)
        expected = expected_parameters(config, str(path))
    except FluxRecipeError as e:
        report.problems.append(str(e))
        return report
    except ShapeError as e:
        report.add(path, f"{e}: not a whole {report.family} transformer")
        return report
    found_shapes = {k: t.shape for k, t in found.tensors.items()}
    wrong = mismatch(expected, found_shapes)
    if wrong.missing:
        report.add(path, f"a {report.family} transformer with these tensors needs {len(wrong.missing)} more ({some_keys(wrong.missing)})")
    if wrong.unexpected or wrong.wrong:
        report.add(path, f"{len(wrong.unexpected) + len(wrong.wrong)} tensor(s) do not fit the {report.family} architecture the others imply ({some_keys(wrong.unexpected + wrong.wrong)})")
    _check_data(path, header, report, hash_data)
    return report


def _check_data(path: Path, header, report: FileReport, hash_data: bool) -> None:
    """The sha256 of a single file's data against its metadata's, and its values finite."""
    recorded = header.metadata.get("fluxrecipe.data_sha256")
    if recorded is None:
        report.add(path, "no fluxrecipe.data_sha256 in its metadata: not a fluxrecipe output (or its metadata was changed), so its data cannot be checked")
    elif hash_data:
        digest, nonfinite = _read(path, header, header.data_start)
        for key, count in nonfinite.items():
            report.add(path, f"tensor '{cut(key)}' holds {count} NaN/Inf value(s): the model would compute NaN")
        if digest != recorded:
            report.add(path, f"the sha256 of its data is {digest}, its metadata says {recorded}: the file changed after the merge")
