"""LoRAs combined as LoRAs, with no model (a recipe with `loras:` and no `sources:`): several merged into one,
one resized to another rank, or converted to another key scheme, from their small factors alone.

The LoRAs are read against the model they imply: the first family (in the registry's order) whose tables name
every module and whose fingerprint their tensors carry, its width the in-width most of their modules have,
its shapes those the LoRAs give their tensors (formats/lora.py, `implied`); then as a bake-in reads them
(strengths, per-block schedules, alphas, unmatched keys: loras.plan_patches). Each module of the output (a
BFL module for format=lora and lora_comfyui, fused q/k/v and linear1 included; a diffusers module for
format=lora_peft) is built from the LoRA modules that change its rows. A *contribution* is one LoRA module's
down with its up rows placed where they go in the output module (zeros in the rows it does not change), so a
fused module is stacked from split ones, and split ones sliced from a fused one, exactly, as diffusers'
converters do:
- convert (one LoRA at strength 1, neither lora_rank nor lora_energy): the factors are copied as they are, their
  alpha with them. Contributions of the LoRA to one output module whose downs are the same bytes (kohya's q/k/v
  written apart, coming back) share that down; others are concatenated (downs stacked, ups block-diagonal)
  with the sum of their alphas where their alpha / rank agree (then the reader's ratio is the same float);
  where they do not, the module is merged as below;
- merge (several LoRAs, or a strength other than 1): the exact sum by concatenation (lowrank.concatenate: the
  rank is the sum of the ranks, the scales go into the factors, alpha = rank);
- lora_rank=R, lora_energy=E: the best rank-R approximation of the sum (lowrank.truncate: QR of the stacked
  factors, an SVD of the small core; with E, per module the smallest rank keeping that fraction of the
  squared norm, at most R), never a full matrix. With E the ranks are settled (`settle`) before the file is
  laid out.
Each module's relative error ||sum - up @ down|| / ||sum|| after rounding to the file's dtype is computed from
the factors too (the norm of a difference of low-rank products is that of a small core), reported and recorded.
`threads` modules are computed at once, each on one thread, within `in_flight`, and written in order; the
bytes do not depend on the thread count (lowrank.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError, PlanError, SourceError
from .families import FAMILIES, Family
from .formats import bfl
from .formats import lora as lora_format
from .formats.layout import Constant, OutFile, OutTensor, TensorRef
from .options import Options
from .loras import LORA_DTYPES, LORA_FORMATS, LoraFile, Patch, plan_patches
from .plan import Plan, PlannedRecipe
from .recipe import DTYPES, Recipe
from .text import cut, some_keys

WIDE = "F32"  # the dtype of a file made of LoRAs in different dtypes, unless the recipe names one


@dataclass(frozen=True)
class Rows:
    """Rows [first, end) of a LoRA module's up (`up`: its rows for one canonical tensor), placed at row `at` of
    the output module and scaled by `scale` (strength * alpha / rank) in a merge."""

    at: int
    up: TensorRef
    first: int
    end: int
    scale: float


@dataclass(frozen=True)
class Contribution:
    """One LoRA's low-rank term on one output module: its down and its up rows; `modules` the LoRA modules it
    comes from (several: their downs are the same bytes), `alpha` theirs as the file gives it (None: = rank)."""

    lora: str
    modules: tuple[str, ...]
    down: TensorRef
    rows: tuple[Rows, ...]
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class OutModule:
    """One module of the output LoRA: its name in the output's scheme, its (out, in) shape, the contributions
    summed into it, the rank written and, for factors copied as they are, the alpha written (None: a merge,
    alpha = rank)."""

    name: str
    shape: tuple[int, int]
    contributions: tuple[Contribution, ...]
    rank: int
    copied: bool
    alpha: float | None = None

    @property
    def nbytes(self) -> int:
        """Memory while it is computed, at most (float64): its terms' factors four times over (read, stacked,
        their QR's or scaling's copies) and the written ones (measured on BFL's linear1: within 10%)."""
        return 8 * sum(self.shape) * (4 * sum(c.rank for c in self.contributions) + self.rank)


@dataclass(frozen=True)
class LoraSpace:
    """What a LoRA-space plan adds to a Plan: how (convert, merge, truncate), the modules in file order, the
    rank and energy asked for, the scheme written and the factors' dtype."""

    how: str
    modules: tuple[OutModule, ...]
    rank: int | None
    energy: float | None
    scheme: str
    dtype: str
    settled: bool  # the ranks are final (without lora_energy from the start)

    def describe(self) -> str:
        """The output line of the printed plan."""
        ranks = sorted({m.rank for m in self.modules})
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}"
        what = {
            "convert": "the LoRA's factors as they are, in another key scheme",
            "merge": "the exact sum of the LoRAs (their factors concatenated, strengths in them)",
            "truncate": f"the best rank-{self.rank} approximation of the sum" if self.energy is None else
                        f"per module the smallest rank keeping {self.energy:g} of the squared norm" + (f", at most {self.rank}" if self.rank else ""),
        }[self.how]
        settled = "" if self.settled else " (ranks settled by their singular values before writing; at most as shown)"
        return f"{what}; {len(self.modules)} modules, {shown}{settled}, {self.dtype}; the relative error of each reported after the run"


def plan_lora_space(
    recipe: Recipe, loras: dict[str, LoraFile], output_format: str, file_name: str, rank: int | None, energy: float | None,
) -> Plan:
    """The plan of a recipe with `loras:` and no `sources:`: every LoRA read (headers, alphas, and the downs
    of modules that may share one), the output's modules and file laid out. Raises PlanError (or SourceError)
    naming the LoRA, the module or the setting."""
    where = f"recipe '{recipe.name}' (format={output_format})"
    scheme = LORA_FORMATS.get(output_format)
    if scheme is None:
        raise PlanError(f"{where}: a recipe with loras and no sources writes a LoRA: choose format=lora, lora_peft or lora_comfyui, or name a model in `sources:` to bake them into")
    if energy is not None and not (isinstance(energy, (int, float)) and not isinstance(energy, bool) and 0 < energy <= 1):
        raise PlanError(f"lora_energy={energy}: must be a number above 0 and at most 1 (the fraction of each module's squared norm kept)")
    family, shapes, hidden, alphas = implied_model(loras)
    patches, summaries = plan_patches(loras, shapes, family, hidden)
    for key, ps in patches.items():
        for p in ps:
            if p.kind != "product":
                raise PlanError(
                    f"lora '{p.lora}' ({loras[p.lora].location}): '{cut(p.module)}' holds {'a bias' if key.endswith('.bias') else 'a whole tensor'} for '{cut(key)}', "
                    "which a LoRA of up and down matrices cannot hold: bake it into a model instead (a recipe with sources)"
                )
    strength = summaries[0].strength
    single = len(loras) == 1 and isinstance(strength, (int, float)) and strength == 1.0
    how = "truncate" if rank is not None or energy is not None else "convert" if single else "merge"
    dtype = _dtype(recipe, patches, where)
    weights = {k: s for k, s in shapes.items() if k in patches}
    modules = _modules(weights, family, hidden, scheme, where)
    built = tuple(_out_module(name, shape, _contributions(parts, patches, alphas), how, rank) for name, shape, parts in modules)
    space = LoraSpace(how, built, rank, energy, scheme, dtype, settled=energy is None)
    notes = _notes(space, family, hidden)
    return Plan(
        recipe=PlannedRecipe.of(recipe), format=output_format, sources=(), steps=(), files=(out_file(space, file_name),), dropped=(), config={},
        notes=tuple(notes), loras=tuple(summaries), lora_rank=rank, family=family, lora_space=space,
    )


def implied_model(loras: dict[str, LoraFile]) -> tuple[Family, dict[str, tuple[int, ...]], int, dict[tuple[str, str], float | None]]:
    """The model the LoRAs imply: its family, the shapes of the canonical tensors they change, its width, and
    each (LoRA, module)'s alpha. The family is the first whose tables name every module of every LoRA and
    whose fingerprint the tensors carry, else the one that names the most."""
    hidden = _width(loras)
    fits, error = [], None
    for family in FAMILIES:
        shapes: dict[str, tuple[int, ...]] = {}
        alphas: dict[tuple[str, str], float | None] = {}
        unmatched = 0
        try:
            for name, file in loras.items():
                found = lora_format.read(name, file.location, file.entries, file.metadata, shapes, family, hidden, implied=True)
                unmatched += len(found.unmatched)
                alphas.update({(name, m.name): m.alpha for m in found.modules})
        except SourceError as e:
            error = e  # FLUX.1's, which names any FLUX-shaped module, is the last
            continue
        if not unmatched and family.recognises(shapes):
            return family, shapes, hidden, alphas
        if shapes:
            fits.append((unmatched, family, shapes, alphas))
    if error is not None and not fits:
        raise error
    if not fits:  # nothing any family names: plan_patches says so, as for a bake-in
        return FAMILIES[-1], {}, hidden, {}
    _, family, shapes, alphas = min(fits, key=lambda f: f[0])
    return family, shapes, hidden, alphas


def _width(loras: dict[str, LoraFile]) -> int:
    """The model's width as the LoRAs say it: the in-width most of their modules have (the attention, the
    modulations and the fused modules all read the hidden state)."""
    widths: Counter[int] = Counter()
    for file in loras.values():
        modules, _ = lora_format.modules_of(file.entries)
        widths.update(roles["down"].shape[1] for m, roles in modules.items() if "down" in roles and len(roles["down"].shape) == 2 and not lora_format.TEXT.match(m))
    if not widths:
        raise SourceError(f"lora '{next(iter(loras))}' ({next(iter(loras.values())).location}) holds no LoRA module of up and down matrices")
    return min(widths, key=lambda w: (-widths[w], w))


def _dtype(recipe: Recipe, patches: dict[str, tuple[Patch, ...]], where: str) -> str:
    """The factors' dtype in the file: the recipe's `dtype` when it names one, else the LoRAs' own (F32 for LoRAs
    in several)."""
    if "dtype" in recipe.resolved:
        dtype = DTYPES[recipe.dtype][0]
        if dtype not in LORA_DTYPES:
            raise PlanError(f"{where}: a LoRA is written in bf16, fp16 or fp32, not {recipe.dtype}: set the recipe's dtype (dtype=bf16)")
        return dtype
    held = {t.dtype for ps in patches.values() for p in ps for t in (p.tensor, p.down)}
    return held.pop() if len(held) == 1 and next(iter(held)) in LORA_DTYPES else WIDE


def _modules(
    weights: dict[str, tuple[int, ...]], family: Family, hidden: int, scheme: str, where: str,
) -> list[tuple[str, tuple[int, int], list[tuple[str, int, int]]]]:
    """The output's modules in file order: (name, (out, in), [(canonical key, first row, end row), ...] in the
    module's row order). BFL's fused modules are made of all their parts: a part no LoRA changes is zeros, of
    `hidden` rows (a fused module's parts but the last have that many); a missing last part is refused."""
    if scheme == "diffusers":
        return [(k[: -len(".weight")], s, [(k, 0, s[0])]) for k, s in sorted(weights.items())]
    complete = dict(weights)
    for key, shape in weights.items():
        found = family.bfl.canonical_pattern.match(key)
        prefix = found[0] if found else ""
        group = family.bfl.group(found[1]) if found else None
        table = group.table if group else {**family.bfl.top, **family.bfl.final}
        for mapping in table.values():
            members = [f"{prefix}{t}.weight" for t in bfl.targets(mapping)]
            if key not in members:
                continue
            for member in members[:-1]:
                complete.setdefault(member, (hidden, shape[1]))
            if members[-1] not in complete:
                raise PlanError(
                    f"{where}: the LoRAs change '{cut(key)}' but not '{cut(members[-1])}', the last part of the fused module that holds them in "
                    f"Black Forest Labs' names, whose rows they do not give: write them as format=lora_peft (diffusers' modules, apart)"
                )
    modules = []
    for tensor in bfl.out_tensors(complete, dict.fromkeys(complete, "F32"), "", family.bfl):
        parts = [(p.key, p.start // complete[p.key][1], p.stop // complete[p.key][1]) for p in tensor.parts]
        if any(k in weights for k, _, _ in parts):
            modules.append((tensor.name[: -len(".weight")], tensor.shape, parts))
    return modules


def _contributions(parts: list[tuple[str, int, int]], patches: dict[str, tuple[Patch, ...]], alphas: dict[tuple[str, str], float | None]) -> tuple[Contribution, ...]:
    """The LoRA terms of one output module: per LoRA module (its down), its up rows in the module's rows; the
    terms of one LoRA whose downs are the same bytes, at the same scale, as one term over that down."""
    terms: dict[tuple, dict] = {}  # (LoRA, where its down's bytes lie) -> the term's fields
    at = 0
    for key, first, end in parts:
        for p in patches.get(key, ()):
            term = terms.setdefault((p.lora, p.down.pieces), {"lora": p.lora, "modules": [], "down": p.down, "rows": [], "alpha": alphas.get((p.lora, p.module))})
            if p.module not in term["modules"]:
                term["modules"].append(p.module)
            term["rows"].append(Rows(at, p.tensor, first, end, p.scale))
        at += end - first
    merged: list[dict] = []
    for term in terms.values():
        same = next((m for m in merged if _one_down(m, term)), None)
        if same is None:
            merged.append(term)
        else:
            same["modules"] += term["modules"]
            same["rows"] += term["rows"]
    return tuple(Contribution(t["lora"], tuple(t["modules"]), t["down"], tuple(t["rows"]), t["alpha"]) for t in merged)


def _one_down(a: dict, b: dict) -> bool:
    """Whether two terms of one LoRA module are one term: the same LoRA, alpha and scale, downs of the same bytes."""
    same_ref = (a["down"].shape, a["down"].dtype) == (b["down"].shape, b["down"].dtype)
    same_scale = len({r.scale for r in a["rows"] + b["rows"]}) == 1
    return a["lora"] == b["lora"] and a["alpha"] == b["alpha"] and same_ref and same_scale and _bytes(a["down"]) == _bytes(b["down"])


def _bytes(ref: TensorRef) -> bytes:
    """A tensor's bytes as its file holds them (a down matrix: rank x in, small)."""
    out = bytearray()
    for piece in ref.pieces:
        fd = os.open(piece.file, os.O_RDONLY)
        try:
            out += os.pread(fd, piece.nbytes, piece.begin)
        finally:
            os.close(fd)
    return bytes(out)


def _out_module(name: str, shape: tuple[int, int], contributions: tuple[Contribution, ...], how: str, rank: int | None) -> OutModule:
    total = sum(c.rank for c in contributions)
    if how == "truncate":
        return OutModule(name, shape, contributions, min(rank or total, *shape), False)
    alpha = _copied_alpha(contributions) if how == "convert" else None
    return OutModule(name, shape, contributions, total, alpha is not None, alpha)


def _copied_alpha(contributions: tuple[Contribution, ...]) -> float | None:
    """The alpha that lets the factors be written as they are: the sum of the contributions' alphas when each
    one's scale is its alpha / rank and all agree, so that the reader's alpha / rank is that same float;
    None where they do not (rsLoRA, several scales): the module is then merged."""
    scales = {r.scale for c in contributions for r in c.rows}
    alphas = [c.alpha if c.alpha is not None else float(c.rank) for c in contributions]
    total = sum(c.rank for c in contributions)
    if len(scales) != 1 or any(a / c.rank not in scales for a, c in zip(alphas, contributions)) or sum(alphas) / total not in scales:
        return None
    return sum(alphas) if len(contributions) > 1 or contributions[0].alpha is not None else None


def out_file(space: LoraSpace, file_name: str) -> OutFile:
    """The LoRA file: per module its down and up, then the alphas (kohya, ComfyUI: F32 scalars; PEFT: its config
    in the header, alpha_pattern for the modules whose alpha is not the most common)."""
    tensors, constants, ranks, alphas = [], [], {}, {}
    for m in space.modules:
        down, up, alpha_name = lora_format.module_names(space.scheme, m.name)
        tensors += [OutTensor(down, space.dtype, (m.rank, m.shape[1]), ()), OutTensor(up, space.dtype, (m.shape[0], m.rank), ())]
        alpha = m.alpha if m.alpha is not None else float(m.rank)
        ranks[m.name], alphas[m.name] = m.rank, alpha
        if alpha_name:
            constants.append(Constant(alpha_name, "F32", (), struct.pack("<f", alpha)))
    metadata = ()
    if space.scheme == "diffusers":
        common = Counter(ranks.values()).most_common(1)[0][0]
        metadata = (("lora_adapter_metadata", lora_format.peft_metadata(ranks, common, alphas)),)
    return OutFile(file_name, tuple(tensors), tuple(constants), metadata)


def _notes(space: LoraSpace, family: Family, hidden: int) -> list[str]:
    notes = [f"read as {family.name} LoRAs of width {hidden}, no model: the output's modules are those the LoRAs change"]
    merged = [m.name for m in space.modules if space.how == "convert" and not m.copied]
    if merged:
        notes.append(f"{len(merged)} modules cannot keep their factors as they are (their parts' alpha / rank differ): their scales go into the factors, alpha = rank ({some_keys(merged)})")
    padded = [m.name for m in space.modules if space.how == "truncate" and m.rank > sum(c.rank for c in m.contributions)]
    if padded and space.energy is None:
        notes.append(f"lora_rank={space.rank} is above the rank {len(padded)} modules have: they are written exactly, padded with zero components ({some_keys(padded)})")
    return notes


# --- the run --------------------------------------------------------------------------------------------------


def settle(plan: Plan, options: Options) -> Plan:
    """A plan with lora_energy, its ranks chosen by each module's singular values (computed from the factors,
    as the run computes them again): the file laid out at those ranks."""
    from .ops.lowrank import truncate

    space = plan.lora_space
    if space.settled:
        return plan
    settled: list[OutModule] = []
    _each_module(space, lambda m: truncate(_terms(m), m.rank, space.energy).rank, lambda m, rank: settled.append(dataclasses.replace(m, rank=rank)), options)
    space = dataclasses.replace(space, modules=tuple(settled), settled=True)
    return dataclasses.replace(plan, lora_space=space, files=(out_file(space, plan.files[0].name),))


def write(plan: Plan, folder: Path, metadata: dict[str, str], header_size: int, options: Options):
    """The LoRA file of a settled plan into `folder`, its modules written in the file's order; the Result holds
    each module's relative error (after rounding) and the file's record."""
    import torch

    from .execute.kernel import DTYPES as TORCH_DTYPES
    from .execute.result import Result
    from .writer import open_safetensors

    started = time.monotonic()
    space, out = plan.lora_space, plan.files[0]
    dtype = TORCH_DTYPES[space.dtype]
    result = Result(files={}, seconds=0.0, bytes_read=sum(r.up.nbytes for m in space.modules for c in m.contributions for r in c.rows), bytes_written=0)
    file = open_safetensors(folder / out.name, out.entries(), {**metadata, **dict(out.metadata)}, header_size)

    def finish(m: OutModule, factors) -> None:
        up, down, error = factors
        result.lora_errors[m.name], result.lora_ranks[m.name] = error, m.rank
        for t in (down, up):
            file.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())

    try:
        _each_module(space, lambda m: _factors(m, space, dtype), finish, options)
        for constant in out.constants:
            file.write(constant.data)
        result.files[out.name] = file.close()
    except BaseException:
        file.abort()
        raise
    result.bytes_written = sum(r.size for r in result.files.values())
    result.seconds = time.monotonic() - started
    return result


def _each_module(space: LoraSpace, compute, finish, options: Options) -> None:
    """compute(module) for every module, `options.compute_workers` at once (each on one thread: the bits do not depend
    on how many) under the `in_flight` budget; finish(module, what it computed) in the file's order."""
    from .execute.scheduler import run_in_order
    from .ops.lowrank import single_threaded

    def alone(m: OutModule):
        with single_threaded():
            return compute(m)

    run_in_order(space.modules, alone, finish, options.compute_workers, options.in_flight, options.most_items)


def _terms(m: OutModule, scaled: bool = True):
    """The module's contributions as lowrank Terms: each up (out x rank, zeros in rows it does not change) with
    its rows' scales in it (float64), over its down."""
    import torch

    from .ops.lowrank import Term

    terms = []
    for c in m.contributions:
        up = torch.zeros(m.shape[0], c.rank, dtype=torch.float64)
        for r in c.rows:
            rows = _tensor(r.up)[r.first : r.end].to(torch.float64)
            up[r.at : r.at + r.end - r.first] = rows * r.scale if scaled else rows
        terms.append(Term(up, _tensor(c.down).to(torch.float64), 1.0))
    return terms


def _tensor(ref: TensorRef):
    import torch

    from .execute.kernel import DTYPES as TORCH_DTYPES

    raw = bytearray(_bytes(ref))
    return torch.frombuffer(raw, dtype=torch.uint8).view(TORCH_DTYPES[ref.dtype]).reshape(ref.shape) if raw else torch.zeros(ref.shape, dtype=TORCH_DTYPES[ref.dtype])


def _factors(m: OutModule, space: LoraSpace, dtype):
    """(up, down) of one module in the file's dtype, and the relative error of their product to the sum."""
    import torch

    from .ops.lowrank import concatenate, truncate

    if m.copied:
        raw = _terms(m, scaled=False)
        up, down = torch.cat([t.up for t in raw], 1), torch.cat([t.down for t in raw], 0)
        terms = None
    else:
        terms = _terms(m)
        if space.how == "truncate":
            cut_ = truncate(terms, m.rank, space.energy)
            up, down = cut_.up, cut_.down
        else:
            up, down = concatenate(terms)
    up, down = up.to(dtype), down.to(dtype)
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise OutputError(f"'{cut(m.name)}': its factors do not fit {space.dtype} (values beyond its range): write the LoRA in fp32 (dtype=fp32)")
    if m.copied and all(t.dtype == space.dtype for c in m.contributions for t in (c.down, *(r.up for r in c.rows))):
        return up, down, 0.0  # the factors as they were, bytes and alpha: nothing to measure
    ratio = (m.alpha / m.rank) if m.copied and m.alpha is not None else 1.0
    return up, down, _relative_error(terms or _terms(m), up, down, ratio)


def _relative_error(terms, up, down, ratio: float) -> float:
    """||S - W||_F / ||S||_F for S the sum of the terms and W = ratio * up @ down the written factors, from the
    factors alone: with G = (Up^T Up) * (Down Down^T) over the terms and W stacked (Gram matrices in float64,
    on one thread, as lowrank.py computes), ||S||^2 is the sum of G's terms block and ||S - W||^2 that of all
    of G with W's sign flipped; never an out x in matrix. An error far below 1 (a rounding) comes out to about
    1e-8 of ||S||."""
    import torch

    from .ops.lowrank import single_threaded

    k = sum(t.up.shape[1] for t in terms)
    ups = torch.empty(up.shape[0], k + up.shape[1], dtype=torch.float64)
    downs = torch.empty(k + up.shape[1], down.shape[1], dtype=torch.float64)
    with single_threaded():
        at = 0
        for t in terms:  # filled in place: the same values as stacking copies, without the copies
            end = at + t.up.shape[1]
            ups[:, at:end] = t.up if t.scale == 1 else t.up.to(torch.float64) * t.scale
            downs[at:end] = t.down
            at = end
        ups[:, k:] = up
        ups[:, k:] *= -ratio  # -(x * ratio), exactly
        downs[k:] = down
        gram = (ups.mT @ ups) * (downs @ downs.mT)
        whole, rest = float(gram[:k, :k].sum()), float(gram.sum())
    return math.sqrt(max(rest, 0.0) / whole) if whole > 0 else 0.0


def format_errors(plan: Plan, result) -> str:
    """The log's account of a LoRA-space run: each module's rank and relative error."""
    space = plan.lora_space
    lines = [f"lora: {space.how}; relative error ||sum - up @ down|| / ||sum|| of each module, after rounding to {space.dtype}:"]
    width = max((len(m.name) for m in space.modules), default=0)
    lines += [f"  {m.name:<{width}}  rank {result.lora_ranks[m.name]:>4}  {result.lora_errors[m.name]:.3e}" for m in space.modules]
    return "\n".join(lines)
