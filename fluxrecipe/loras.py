"""LoRAs in a merge, at plan time: baked into the rules' result (`loras:`), or the merge written as one.

Bake-in: every LoRA file is opened (headers and alphas only), read against the output's tensors
(formats/lora.py), and becomes Patches: plain data on the Steps it changes, one per LoRA and tensor, in the
recipe's order. The executor adds them to the rules' result in float32 before the single rounding:
    W + sum over LoRAs of strength * (alpha / rank) * (up @ down)  (+ strength * (alpha / rank) * up_bias)
and a control LoRA's norm tensors replace the result. A key no LoRA changes is planned exactly as without LoRAs.

Written as a LoRA (`format=lora`: kohya keys on BFL's modules with alpha; `format=lora_peft`: diffusers'
keys and PEFT's config): every weight matrix whose result may differ from the base is a Factor, the whole
difference of its rows to the base factored by a truncated SVD in the executor (a difference that turns
out exactly 0 is left out of the file: it would be zeros); the 1-D tensors (biases, norms), which a LoRA
cannot hold, are Factors of rank 0: measured, listed, not written.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from . import schedule
from .errors import PlanError, SourceError
from .families import Family
from .files import NOT_REGULAR
from .formats import FORMATS, bfl
from .formats import lora as lora_format
from .formats.layout import Constant, OutFile, OutTensor, Part, TensorRef, whole
from .formats.safetensors import TensorEntry, read_header
from .recipe import LoraSpec
from .sources import file_hash, local_path
from .schedule import Blocks, Schedule
from .text import cut

LORA_FORMATS = {name: f.lora_scheme for name, f in FORMATS.items() if f.lora_scheme}  # output format -> the key scheme it writes
LORA_DTYPES = ("BF16", "F16", "F32")
PEFT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers writes into a LoRA folder
EXACT_SVD = 1024  # a matrix whose smaller side is at most this is factored by an exact SVD, larger ones by the randomized range finder (ops/lowrank.py)
EXACT_SVD_BYTES = 32 << 20  # ... and whose float32 size is at most this: the exact SVD holds the matrix and about 5 times it in float64
SHOWN = 4


@dataclass(frozen=True)
class LoraFile:
    """A LoRA the recipe names, located (fetched from the hub if need be); headers read, no tensor data."""

    spec: LoraSpec
    location: str
    origin: dict[str, str]
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def open_lora(spec: LoraSpec) -> LoraFile:
    """Find a LoRA's file: a local .safetensors file (or a folder holding one), or a file of a hub repo."""
    what = f"lora '{spec.name}'"
    if spec.repo:
        from .hub import fetch_file

        path, origin = fetch_file(what, spec.repo, spec.file, spec.revision)
    else:
        path = Path(local_path(spec.path, spec.recipe_dir)).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            preferred = [p for p in files if p.name == PEFT_FILE]
            if len(preferred or files) != 1:
                found = ", ".join(p.name for p in files) or "none"
                raise SourceError(f"{what}: {path} is a folder: name the LoRA's .safetensors file in it (it holds {found})")
            path = (preferred or files)[0]
        elif not path.exists():
            raise SourceError(f"{what}: {path}: no such file")
        elif path.suffix != ".safetensors":
            raise SourceError(f"{what}: {path} is not a .safetensors file")
        elif not path.is_file():
            raise SourceError(f"{what}: {path}: {NOT_REGULAR}")
        origin = {"path": str(path.resolve()), "content_hash": file_hash(path)}
        if spec.content_hash and spec.content_hash != origin["content_hash"]:
            raise SourceError(
                f"{what}: {path} is not the file this recipe was made with (content hash {origin['content_hash']}, "
                f"the recipe says {spec.content_hash}): remove content_hash from the recipe to use it anyway"
            )
    header = read_header(str(path))
    if not header.entries:
        raise SourceError(f"{what}: {path} holds no tensors")
    return LoraFile(spec, str(path), origin, header.entries, header.metadata)


# --- bake-in ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """One LoRA's change to one canonical tensor, resolved for that key: kind "product" adds
    scale * up @ down (`tensor`: the up rows of this tensor, `down`: the whole down), "add" adds
    scale * tensor (a control LoRA's bias), "replace" puts the tensor in place of the result."""

    lora: str
    kind: str
    tensor: TensorRef
    down: TensorRef | None
    scale: float  # strength * alpha / rank
    module: str = ""  # the LoRA module as the file names it

    @property
    def nbytes(self) -> int:
        return self.tensor.nbytes + (self.down.nbytes if self.down else 0)


@dataclass(frozen=True)
class LoraSummary:
    """What the plan says of one baked-in LoRA."""

    name: str
    spec: str
    origin: dict[str, str]
    location: str
    format: str
    ranks: tuple[int, ...]
    alphas: tuple[float | None, ...]  # one per rank above; None: the file gives none (alpha = rank)
    strength: float | Schedule
    tensors: int  # how many tensors of the output it changes
    blocks: tuple[str, ...]
    unmatched: tuple[tuple[str, str], ...]  # keys that change nothing, with why (ignore_unmatched)
    ignored: int  # text-encoder keys

    def describe(self) -> str:
        pairs = sorted(set(zip(self.ranks, self.alphas)), key=lambda p: (p[0], p[1] is None, p[1] or 0))
        shown = ", ".join(f"rank {r} " + (f"alpha {_number(a)}" if a is not None else "no alpha (= rank)") for r, a in pairs[:3])
        more = f" and {len(pairs) - 3} more" if len(pairs) > 3 else ""
        strength = f"per block {self.strength}" if isinstance(self.strength, Schedule) else _number(self.strength)
        return f"{self.format}, {shown or 'no low-rank modules'}{more}, strength {strength}: {self.tensors} tensors in {blocks_text(self.blocks)}"


def strength_of(spec: LoraSpec, key: str, blocks: Blocks) -> float:
    """The strength a LoRA applies with on canonical tensor `key`: its number, or its schedule's for the
    key's block (issue 9's schedules, as op parameters take them)."""
    return schedule.value_for(spec.strength, key, blocks)


def plan_patches(
    loras: dict[str, LoraFile], shapes: dict[str, tuple[int, ...]], family: Family, hidden: int | None = None,
) -> tuple[dict[str, tuple[Patch, ...]], list[LoraSummary]]:
    """Every LoRA read against the output's tensors (a model of `family`; `hidden`: its width, where `shapes`
    lacks its input layer): canonical key -> its patches, in the recipe's LoRA order; and a summary per LoRA. Raises PlanError when a LoRA's keys change no tensor of the output (unless the
    LoRA says `ignore_unmatched: true`) or the LoRA changes nothing at all."""
    patches: dict[str, list[Patch]] = {}
    summaries = []
    blocks = Blocks.of(shapes, family)
    for name, file in loras.items():
        spec = file.spec
        found = lora_format.read(name, file.location, file.entries, file.metadata, shapes, family, hidden)
        try:
            schedule.check_against(spec.strength, {c.key for c in found.changes}, blocks)
        except ValueError as e:
            raise PlanError(f"{spec.where}.strength: LoRA '{name}' strength {e}") from None
        if found.unmatched and not spec.ignore_unmatched:
            raise PlanError(
                f"{spec.where} ({file.location}, {found.format} format): {len(found.unmatched)} of its keys change no tensor of the output: "
                f"{_unmatched_text(found.unmatched)}; if that is expected, set `ignore_unmatched: true` on this LoRA"
            )
        changed = set()
        for c in found.changes:
            strength = strength_of(spec, c.key, blocks)
            if strength == 0.0:
                continue
            scale = 1.0 if c.kind == "replace" else c.ratio * strength  # as PEFT: (alpha / rank) * scale
            patches.setdefault(c.key, []).append(Patch(name, c.kind, c.tensor, c.down, scale, c.module))
            changed.add(c.key)
        if not found.changes:
            raise PlanError(f"{spec.where} ({file.location}): none of its keys changes a tensor of the output ({_unmatched_text(found.unmatched)}): is it a LoRA for {family.name}?")
        summaries.append(LoraSummary(
            name, spec.describe(), file.origin, file.location, found.format,
            tuple(m.rank for m in found.modules), tuple(m.alpha for m in found.modules),
            spec.strength, len(changed), tuple(sorted({b for k in changed if (b := family.block_of(k))}, key=family.block_order)),
            tuple(found.unmatched), found.ignored,
        ))
    return {k: tuple(v) for k, v in patches.items()}, summaries


def lora_notes(summaries: list[LoraSummary]) -> list[str]:
    notes = []
    for s in summaries:
        if s.ignored:
            notes.append(f"lora '{s.name}': its {s.ignored} text-encoder keys are ignored (fluxrecipe merges the transformer)")
        if s.unmatched:
            notes.append(f"warning: lora '{s.name}': {len(s.unmatched)} keys change nothing (ignore_unmatched): {_unmatched_text(list(s.unmatched))}")
    return notes


def blocks_text(blocks: tuple[str, ...]) -> str:
    """Consecutive blocks of a group as ranges: 'GROUP.0-18, OTHER.0-37, BLOCK'."""
    out: list[str] = []
    runs: dict[str, list[list[int]]] = {}
    for block in blocks:
        group, _, index = block.rpartition(".")
        if group and index.isdigit():
            if group not in runs:
                runs[group] = []
                out.append(group)
            if runs[group] and runs[group][-1][1] == int(index) - 1:
                runs[group][-1][1] = int(index)
            else:
                runs[group].append([int(index), int(index)])
        else:
            out.append(block)
    return ", ".join(
        f"{b}." + ",".join(f"{a}" if a == z else f"{a}-{z}" for a, z in runs[b]) if b in runs else b for b in out
    ) or "no block"


def _unmatched_text(unmatched: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"'{cut(k)}' ({why})" for k, why in unmatched[:SHOWN])
    return shown + (f"; and {len(unmatched) - SHOWN} more" if len(unmatched) > SHOWN else "")


def _number(x: float) -> str:
    return f"{x:g}"


# --- a merge written as a LoRA ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Factor:
    """One matrix of a merge written as a LoRA: the difference between the recipe's result and the base over
    the rows `parts` (element ranges of steps, in the module's row order: BFL's fused modules, the final
    layer's swap), factored to `rank` and written as `down` and `up`. Rank 0: a 1-D tensor, which a LoRA
    cannot hold: its difference is measured and listed, not written. `changed[i]` is False for a part the
    recipe leaves equal to the base (its difference is 0: not read)."""

    module: str
    parts: tuple[Part, ...]
    bases: tuple[TensorRef, ...]
    changed: tuple[bool, ...]
    shape: tuple[int, ...]
    rank: int
    down: str | None = None
    up: str | None = None
    alpha: str | None = None  # format=lora: the name of its alpha

    @property
    def exact(self) -> bool:
        return min(self.shape) <= EXACT_SVD and math.prod(self.shape) * 4 <= EXACT_SVD_BYTES  # a tall thin one is streamed too

    @property
    def names(self) -> tuple[str, ...]:
        """The names of what it writes into the file."""
        return tuple(n for n in (self.down, self.up, self.alpha) if n)


def unwritten(factors: tuple[Factor, ...] | list[Factor], left_out: Collection[str]) -> set[str]:
    """The tensor names a LoRA output leaves out of its file: those of the matrices (modules `left_out`) whose
    difference to the base turned out to be exactly 0, which a LoRA would hold as zeros."""
    return {name for f in factors if f.module in left_out for name in f.names}


def lora_output(
    output_format: str, shapes: dict[str, tuple[int, ...]], changed: dict[str, bool], bases: dict[str, TensorRef],
    rank: int, dtype: str, file_name: str, where: str, family: Family,
) -> tuple[OutFile, tuple[Factor, ...]]:
    """The LoRA file of a merge (its down/up tensors, alphas, metadata) and the factors that fill it in order
    (the matrices, then the 1-D tensors it cannot hold). `changed`: canonical key -> whether the recipe's
    result may differ from the base."""
    if dtype not in LORA_DTYPES:
        raise PlanError(f"{where}: a LoRA is written in bf16, fp16 or fp32, not {dtype}: set the recipe's dtype (dtype=bf16)")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise PlanError(f"lora_rank={rank}: must be a whole number above 0")
    if not any(changed.values()):
        raise PlanError(f"{where}: the recipe's result is its base everywhere, so the LoRA would be empty: take another source or bake LoRAs into it")
    if LORA_FORMATS[output_format] != "diffusers":  # BFL module names
        modules = [(t.name[: -len(".weight")], t.parts) for t in bfl.out_tensors(shapes, dict.fromkeys(shapes, dtype), "", family.bfl) if t.name.endswith(".weight") and len(t.shape) == 2]
    else:
        modules = [(k[: -len(".weight")], whole(k, s)) for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    matrices = []
    for module, parts in modules:
        if not any(changed[p.key] for p in parts):
            continue
        width = shapes[parts[0].key][1]
        matrices.append((module, parts, (sum(p.stop - p.start for p in parts) // width, width)))
    if not matrices:
        raise PlanError(f"{where}: no weight matrix of the recipe's result differs from its base, and a LoRA holds weight matrices only")
    largest = max(min(shape) for _, _, shape in matrices)
    if rank > largest:
        raise PlanError(f"lora_rank={rank} is larger than any matrix of this LoRA allows: the largest rank one can hold is {largest} ({len(matrices)} matrices)")
    factors, tensors, constants = [], [], []
    for module, parts, shape in matrices:
        r = min(rank, *shape)
        down, up, alpha = lora_format.module_names(LORA_FORMATS[output_format], module)
        if alpha:
            constants.append(Constant(alpha, "F32", (), struct.pack("<f", float(r))))
        tensors += [OutTensor(down, dtype, (r, shape[1]), ()), OutTensor(up, dtype, (shape[0], r), ())]
        factors.append(Factor(module, tuple(parts), tuple(bases[p.key] for p in parts), tuple(changed[p.key] for p in parts), shape, r, down, up, alpha))
    flat = [k for k, s in shapes.items() if len(s) != 2 and changed[k]]
    factors += [Factor(k, whole(k, shapes[k]), (bases[k],), (True,), shapes[k], 0) for k in flat]
    return OutFile(file_name, tuple(tensors), tuple(constants), _own_metadata(output_format, factors, rank, ())), tuple(factors)


def as_written(
    out: OutFile, output_format: str, factors: tuple[Factor, ...], rank: int, left_out: Collection[str], ranks: dict[str, int] | None = None,
) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict[str, str], list[Constant]]:
    """A LoRA output's file as written: its header's entries, its own metadata and its constants (the alphas),
    less the matrices left out (`left_out`: their difference to the base was exactly 0), which PEFT's config
    then does not name either (diffusers warns of a config that names modules the file lacks); at the ranks
    the run chose (`ranks`, module -> rank: lora_energy), each alpha that rank."""
    ranks = ranks or {}
    shapes, alphas = {}, {}
    for f in factors:
        if f.module in ranks:
            shapes[f.down], shapes[f.up] = (ranks[f.module], f.shape[1]), (f.shape[0], ranks[f.module])
            alphas[f.alpha] = struct.pack("<f", float(ranks[f.module]))
    dropped = unwritten(factors, left_out)
    entries = [(name, dtype, shapes.get(name, shape)) for name, dtype, shape in out.entries(without=dropped)]
    constants = [Constant(c.name, c.dtype, c.shape, alphas.get(c.name, c.data)) for c in out.constants if c.name not in dropped]
    return entries, dict(_own_metadata(output_format, factors, rank, left_out, ranks)), constants


def _own_metadata(output_format: str, factors, rank: int, left_out: Collection[str], ranks: dict[str, int] | None = None) -> tuple[tuple[str, str], ...]:
    """format=lora_peft: PEFT's config (`lora_adapter_metadata`) of the matrices the file holds, at their ranks."""
    if LORA_FORMATS[output_format] != "diffusers":
        return ()
    held = {f.module: (ranks or {}).get(f.module, f.rank) for f in factors if f.rank and f.module not in left_out}
    return (("lora_adapter_metadata", lora_format.peft_metadata(held, rank)),)
