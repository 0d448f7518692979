"""One chunk of a step's inputs in, its result out: decode -> op -> LoRA patches -> NaN/Inf checks -> encode.

A pure function of tensors and the step: the bytes come in already read (the reader's job), the results go
out as values (the scheduler folds them in and the sink writes them), and nothing here touches a file, a
thread or the options beyond `Checks`. So it can be tested on tensors alone, and any caller (files on disk,
a pipeline's state dict in memory) gets the same bits.

A chunk has one of four kinds: "stat" (a partial of one of the op's statistics passes over the whole
tensor), "absmax" (the largest |result|, which sets a scaled-fp8 tensor's scale), "value" (the encoded
result) and "diff" (a LoRA output: the result minus the base, in float32, before factoring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from gguf import GGMLQuantizationType

from ..errors import OutputError, SourceError
from ..formats.gguf import BLOCK_TYPES, dequantize_chunk, quantize_chunk
from ..formats.layout import TensorRef, row_size, rows
from ..ops import OPS, Where
from ..ops.lora import ROWS, product_rows
from ..plan import Step
from ..text import cut

# safetensors dtype code -> torch dtype, and the largest finite value of each output dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
LIMITS = {code: float(torch.finfo(dtype).max) for code, dtype in DTYPES.items()}
LIMITS.update(dict.fromkeys(BLOCK_TYPES, LIMITS["F32"]))  # a block's scale follows its values: none is clamped


@dataclass(frozen=True)
class Checks:
    """What the kernel needs of the run's options."""

    device: torch.device
    nonfinite: str  # "error": NaN/Inf stops the merge; "warn": counted
    rule: str = ""  # the step's rule as a person reads it (for an overflow's message)
    observed: bool = True  # whether the values as written are looked at (diagnostics): a GGUF block's are dequantized back only then


@dataclass
class LoraChunk:
    """One LoRA patch's tensors for a chunk, as read: the raw elements of its tensor (a bias or a replacement:
    the chunk's elements; a product: the rows of up of `patch_rows`), and its down (a product): decoded, when a
    cache had it, else raw."""

    values: torch.Tensor
    down: torch.Tensor | None = None
    down_raw: torch.Tensor | None = None


@dataclass
class ChunkIn:
    """Elements [start, stop) of a step: the raw bytes of each input, of its LoRAs and (diff) of the base."""

    kind: str  # "stat", "absmax", "value" or "diff"
    start: int
    stop: int
    raws: list[torch.Tensor]
    loras: list[LoraChunk] = field(default_factory=list)
    base: torch.Tensor | None = None  # diff: the base's raw elements
    base_ref: TensorRef | None = None
    stats: tuple = ()  # the results of the op's statistics passes so far
    pass_index: int = 0  # stat: which pass
    scale: float | None = None  # value: a scaled-fp8 tensor's scale


@dataclass
class ChunkOut:
    data: torch.Tensor | None = None  # value: the encoded bytes (uint8); diff: the float32 difference
    partial: Any = None  # stat: the pass's partial; absmax: the chunk's absmax
    nonfinite: dict[str, int] = field(default_factory=dict)  # "source: key" / "lora X: key" / "output: key" -> NaN/Inf values
    clamped: int = 0
    inputs: list[torch.Tensor] = field(default_factory=list)  # the inputs decoded to float32 (for observers)
    written: torch.Tensor | None = None  # value: the values as written (output dtype; float32 for copied bytes; a GGUF block type's only when observed)
    downs: list[tuple[TensorRef, torch.Tensor]] = field(default_factory=list)  # downs decoded here, for a cache


def compute(step: Step, chunk: ChunkIn, checks: Checks) -> ChunkOut:
    """The chunk's result (see the module's docstring); raises SourceError/OutputError for NaN/Inf under
    nonfinite=error."""
    xs = [decode(raw, ref, checks.device) for raw, ref in zip(chunk.raws, step.inputs)]
    out = ChunkOut(inputs=xs)
    _check_inputs(step.inputs, xs, checks, out)  # nonfinite=error stops at the first pass that reads a NaN
    if chunk.kind == "stat":
        if out.nonfinite:  # nonfinite=warn: a NaN/Inf counts as 0 in a statistic, so it spoils its own elements only
            xs = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in xs]
        out.partial = OPS[step.op].passes[chunk.pass_index].partial(xs, where(step, chunk.start, chunk.stop), chunk.stats, step.values)
        return out
    if chunk.kind == "value" and step.copies_bytes:
        out.data, out.written = chunk.raws[0], xs[0]
        return out
    merged, base = apply(step, xs, chunk.start, chunk.stop, chunk.stats), None
    if chunk.kind == "diff":  # the difference first, then the LoRAs' changes: (op - base) + delta loses nothing to W's size
        base = decode(chunk.base, chunk.base_ref, checks.device)
        _check_inputs((chunk.base_ref,), [base], checks, out)
        merged = merged - base
    if step.patches:
        merged = _patch(step, merged, xs, chunk, checks, out, base)
    if chunk.kind == "diff":
        out.data = merged
        return out
    if chunk.kind == "absmax":
        finite = merged[torch.isfinite(merged)]
        out.partial = float(finite.abs().max()) if finite.numel() else 0.0
        return out
    encoded, out.clamped = encode(step, merged, chunk.scale, checks, out)
    if step.dtype in BLOCK_TYPES:  # whole blocks of a GGUF tensor, quantized once from float32 as gguf.quants does
        ggml_type = GGMLQuantizationType[step.dtype]
        out.data = torch.from_numpy(quantize_chunk(encoded.cpu(), ggml_type).reshape(-1))
        if checks.observed:  # the values a reader gets back (a fifth to two fifths of the quantizer's own time)
            out.written = torch.from_numpy(dequantize_chunk(out.data.numpy(), ggml_type))
        return out
    out.written = encoded
    out.data = encoded.cpu().view(torch.uint8)
    return out


def where(step: Step, start: int, stop: int) -> Where:
    return Where(step.key, start, stop, tuple(t.source for t in step.inputs), step.numel)


def apply(step: Step, xs: list[torch.Tensor], start: int, stop: int, stats: tuple) -> torch.Tensor:
    """The step's op on its decoded inputs, with `where` and `stats` when it declares them."""
    spec = OPS[step.op]
    kwargs = step.values
    if spec.wants("where"):
        kwargs["where"] = where(step, start, stop)
    if spec.wants("stats"):
        kwargs["stats"] = stats
    return spec.call(xs, kwargs)


def decode(raw: torch.Tensor, ref: TensorRef, device: torch.device) -> torch.Tensor:
    if ref.dtype in BLOCK_TYPES:  # whole blocks of a GGUF tensor, dequantized as gguf.quants does
        return torch.from_numpy(dequantize_chunk(raw.numpy(), GGMLQuantizationType[ref.dtype])).to(device)
    x = to_float32(raw.view(DTYPES[ref.dtype]).to(device=device))
    return x if ref.scale is None else x.mul_(ref.scale.value)


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """x as float32, exactly. fp8 on the CPU goes through float16, which holds every fp8 value: torch's own
    fp8 conversion there is some 50 times slower than bf16's, which made reading back an fp8 output for its
    diagnostics the dearest step of an fp8 merge. e5m2 is float16's high byte; e4m3fn's seven magnitude bits,
    shifted into float16's place, read as its value / 256 (normal and subnormal alike); its NaN (all seven
    set) becomes one of float16's."""
    if x.device.type != "cpu" or x.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return x.to(torch.float32)
    bits = x.view(torch.uint8).to(torch.int16)
    if x.dtype == torch.float8_e5m2:
        return bits.bitwise_left_shift_(8).view(torch.float16).to(torch.float32)
    magnitude = bits & 0x7F
    nan = (magnitude + 1).bitwise_right_shift_(7).mul_(0x7E00)  # 0x7F -> float16 bits 0x7F80, a NaN
    half = (bits & 0x80).bitwise_left_shift_(8).bitwise_or_(magnitude.bitwise_left_shift_(7)).bitwise_or_(nan)
    return half.view(torch.float16).to(torch.float32).mul_(256.0)


def patch_rows(step: Step, start: int, stop: int) -> tuple[int, int]:
    """The rows [lo, hi) of a LoRA product that elements [start, stop) need: whole blocks of ROWS rows."""
    width = row_size(step.shape)
    first, end = start // width, -(-stop // width)
    return first // ROWS * ROWS, min(-(-end // ROWS) * ROWS, rows(step.shape))


def _patch(step: Step, merged: torch.Tensor, xs: list[torch.Tensor], chunk: ChunkIn, checks: Checks, out: ChunkOut, base: torch.Tensor | None) -> torch.Tensor:
    """The step's LoRAs applied to its op's result, in order, in float32, as PEFT fuses them:
    W + (up @ down) * scale for a product, W + tensor * scale for a bias, the tensor for a replacement.
    With `base` (a diff chunk: `merged` is the result minus base), a replacement is its difference to base."""
    if any(merged is x for x in xs):
        merged = merged.clone()  # an op that returns its input (`take`): the observers still compare that input
    width = row_size(step.shape)
    for p, read in zip(step.patches, chunk.loras):
        if p.down is None:
            values = _lora_values(p, p.tensor, read.values, checks, out)
            if p.kind == "replace":
                merged = values if base is None else values - base
            else:
                merged = merged.add_(values.mul_(p.scale))
            continue
        lo, hi = patch_rows(step, chunk.start, chunk.stop)
        rank = p.down.shape[0]
        up = _lora_values(p, p.tensor, read.values, checks, out).view(hi - lo, rank)
        down = read.down
        if down is None:
            down = _lora_values(p, p.down, read.down_raw, checks, out).view(p.down.shape)
            out.downs.append((p.down, down))
        delta = product_rows(up, down).view(-1)
        merged.add_(delta[chunk.start - lo * width : chunk.stop - lo * width].mul_(p.scale))
    return merged


def _lora_values(p, ref: TensorRef, raw: torch.Tensor, checks: Checks, out: ChunkOut) -> torch.Tensor:
    """A LoRA's tensor's elements in float32, checked for NaN/Inf as inputs are."""
    x = decode(raw, ref, checks.device)
    _check_finite(x, f"lora '{p.lora}'", ref, f"lora {p.lora}: {ref.file_key}", checks, out)
    return x


def encode(step: Step, merged: torch.Tensor, scale: float | None, checks: Checks, out: ChunkOut) -> tuple[torch.Tensor, int]:
    """The result in the output dtype: NaN/Inf of finite inputs stopped or counted, values beyond the
    dtype's finite range clamped and counted, divided by the scale for scaled fp8, rounded once."""
    x = merged if scale is None else merged / scale
    low, high = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(low) and math.isfinite(high)):
        _nonfinite_result(step, x, checks, out)
        finite = x[torch.isfinite(x)]
        low, high = (float(v) for v in torch.aminmax(finite)) if finite.numel() else (0.0, 0.0)
    limit, clamped = LIMITS[step.dtype], 0
    if low < -limit or high > limit:
        if scale is None:  # a scaled tensor fits by construction, up to one rounding of the division
            clamped = int(((x < -limit) | (x > limit)).sum())
        x = x.clamp(-limit, limit)
    return x.to(DTYPES.get(step.dtype, torch.float32)), clamped  # a GGUF block type: quantized from float32 by the caller


def scale_of(absmax: float, dtype: str) -> float:
    """Scaled fp8's per-tensor scale: absmax / the dtype's largest value, in float32 (1 where that is 0: a zero
    tensor, or one so small that the division underflows, whose values then round to 0 as they would anyway)."""
    scale = float(torch.tensor(absmax, dtype=torch.float32) / LIMITS[dtype])
    return scale if scale > 0.0 else 1.0


def _nonfinite_result(step: Step, x: torch.Tensor, checks: Checks, out: ChunkOut) -> None:
    """NaN/Inf in a result: expected where an input held some (already counted); from finite inputs, the
    op's float32 arithmetic overflowed: stop (nonfinite=error) or count it (warn)."""
    if out.nonfinite:
        return
    bad = int(x.numel() - torch.isfinite(x).sum())
    if checks.nonfinite == "error":
        raise OutputError(
            f"'{cut(step.key)}' ({checks.rule}) comes out with {bad} NaN/Inf values from finite inputs (float32 overflow): "
            "check the op's parameters, or merge anyway with nonfinite=warn (they are counted and reported)"
        )
    out.nonfinite[f"output: {step.key}"] = bad


def _check_inputs(refs: tuple[TensorRef, ...], xs: list[torch.Tensor], checks: Checks, out: ChunkOut) -> None:
    """NaN/Inf in an input: stop (nonfinite=error), or count it (warn)."""
    for ref, x in zip(refs, xs):
        _check_finite(x, f"source '{ref.source}'", ref, f"{ref.source}: {ref.key}", checks, out)


def _check_finite(x: torch.Tensor, owner: str, ref: TensorRef, counted_as: str, checks: Checks, out: ChunkOut) -> None:
    """One input read (`owner`: its source or LoRA): NaN/Inf stops the merge, or is counted as `counted_as`.
    A sum over x is NaN/Inf iff x holds NaN/Inf, or overflows, which the exact count then clears."""
    if math.isfinite(float(x.sum())):
        return
    bad = int(x.numel() - torch.isfinite(x).sum())
    if bad and checks.nonfinite == "error":
        raise SourceError(f"{owner}: tensor '{cut(ref.file_key)}' ({ref.file}) holds NaN or Inf values; merge anyway with nonfinite=warn (they are counted and reported)")
    if bad:
        out.nonfinite[counted_as] = bad
