"""The kernel alone, on tensors: no file, no reader, no thread. Each result is checked bit for bit against
a reference computed here in float32 by other means (torch's own ops, whole tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from fluxrecipe.errors import OutputError, SourceError
from fluxrecipe.execute.kernel import Checks, ChunkIn, LoraChunk, compute, patch_rows, scale_of, to_float32
from fluxrecipe.formats.layout import Piece, TensorRef
from fluxrecipe.loras import Patch
from fluxrecipe.ops import OPS
from fluxrecipe.plan import Step

CPU = Checks(torch.device("cpu"), "error", "rules[0] (match '.*', op lerp:0.3)")
WARN = Checks(torch.device("cpu"), "warn", "rules[0]")
SHAPE = (96, 8)  # 96 rows: more than one block of the LoRA product's 64 rows


def ref(source: str, dtype: str = "BF16", shape=SHAPE, key: str = "w.weight") -> TensorRef:
    """A tensor reference whose file is never opened: the kernel is handed bytes."""
    return TensorRef(source, key, key, dtype, shape, (Piece(f"/nowhere/{source}", 0, 0),))


def raw(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1).view(torch.uint8)


def values(seed: int, dtype=torch.bfloat16, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_a_lerp_chunk_is_the_float32_formula_rounded_once():
    a, b = values(1), values(2)
    step = Step("w.weight", 0, "lerp", (("alpha", 0.3),), (ref("a"), ref("b")), "BF16", SHAPE)
    start, stop = 100, 300
    out = compute(step, ChunkIn("value", start, stop, [raw(a.view(-1)[start:stop]), raw(b.view(-1)[start:stop])]), CPU)
    want = (a.float() * 0.7 + b.float() * 0.3).to(torch.bfloat16).view(-1)[start:stop]
    assert out.data.view(torch.bfloat16).view(torch.int16).equal(want.view(torch.int16))
    assert out.nonfinite == {} and out.clamped == 0


def test_take_in_the_same_dtype_hands_back_the_bytes_it_was_given():
    a = values(3)
    bits = raw(a)
    bits[0:2] = torch.tensor([0xC1, 0x7F], dtype=torch.uint8)  # a NaN payload that a decode/encode would change
    step = Step("w.weight", 0, "take", (("source", "a"),), (ref("a"),), "BF16", SHAPE)
    out = compute(step, ChunkIn("value", 0, a.numel(), [bits]), WARN)
    assert out.data is bits
    assert out.nonfinite == {"a: w.weight": 1}


def test_a_lora_product_is_added_before_the_one_rounding():
    """W + scale * (up @ down) for the chunk's elements, the product on whole blocks of 64 rows. Small
    integers make every float32 product and sum exact, so any order of summation gives the reference's bits."""
    g = torch.Generator().manual_seed(4)
    w = torch.randint(-8, 8, SHAPE, generator=g).float()
    up, down = torch.randint(-4, 4, (SHAPE[0], 4), generator=g).float(), torch.randint(-4, 4, (4, SHAPE[1]), generator=g).float()
    patch = Patch("style", "product", ref("style", "F32", (SHAPE[0], 4), "up"), ref("style", "F32", (4, SHAPE[1]), "down"), 0.5)
    step = Step("w.weight", 0, "take", (("source", "a"),), (ref("a", "F32"),), "F32", SHAPE, patches=(patch,))
    start, stop = 8 * 70 + 3, 8 * 90  # rows 70..89: the second block of rows [64, 96)
    lo, hi = patch_rows(step, start, stop)
    assert (lo, hi) == (64, 96)
    chunk = ChunkIn("value", start, stop, [raw(w.view(-1)[start:stop])], [LoraChunk(raw(up[lo:hi]), down_raw=raw(down))])
    out = compute(step, chunk, CPU)
    want = (w + 0.5 * (up @ down)).view(-1)[start:stop]
    assert out.data.view(torch.float32).equal(want)
    assert [r for r, _ in out.downs] == [patch.down] and out.downs[0][1].equal(down)  # decoded once, for the cache
    again = compute(step, ChunkIn("value", start, stop, chunk.raws, [LoraChunk(raw(up[lo:hi]), down=down)]), CPU)
    assert again.data.equal(out.data) and again.downs == []


def test_values_beyond_fp8_are_clamped_and_counted():
    x = torch.tensor([1.0, 500.0, -1000.0, 3.0]).to(torch.bfloat16)
    step = Step("w.weight", 0, "take", (("source", "a"),), (ref("a", shape=(4,)),), "F8_E4M3", (4,))
    out = compute(step, ChunkIn("value", 0, 4, [raw(x)]), CPU)
    assert out.clamped == 2
    assert out.data.view(torch.float8_e4m3fn).float().tolist() == [1.0, 448.0, -448.0, 3.0]


def test_a_scaled_chunk_is_divided_by_its_scale_before_the_rounding():
    x = values(5, torch.float32, (4, 8))
    absmax = float(x.abs().max())
    scale = scale_of(absmax, "F8_E4M3")
    assert scale == float(torch.tensor(absmax) / 448.0)
    step = Step("w.weight", 0, "take", (("source", "a"),), (ref("a", "F32", (4, 8)),), "F8_E4M3", (4, 8), scaled=True)
    out = compute(step, ChunkIn("value", 0, 32, [raw(x)], scale=scale), CPU)
    assert out.data.view(torch.float8_e4m3fn).view(torch.uint8).equal((x / scale).to(torch.float8_e4m3fn).view(torch.uint8).view(-1))
    absmax_out = compute(step, ChunkIn("absmax", 0, 32, [raw(x)]), CPU)
    assert absmax_out.partial == absmax


def test_nan_in_an_input_stops_or_is_counted():
    x = values(6, torch.float32, (16,))
    x[3] = math.nan
    x[7] = math.inf
    step = Step("w.weight", 0, "lerp", (("alpha", 0.5),), (ref("a", "F32", (16,)), ref("b", "F32", (16,))), "F32", (16,))
    chunk = ChunkIn("value", 0, 16, [raw(x), raw(torch.zeros(16))])
    with pytest.raises(SourceError, match=r"source 'a': tensor 'w.weight' \(/nowhere/a\) holds NaN or Inf values"):
        compute(step, chunk, CPU)
    assert compute(step, chunk, WARN).nonfinite == {"a: w.weight": 2}


def test_overflow_from_finite_inputs_names_the_rule():
    big = torch.full((4,), 3e38)
    step = Step("w.weight", 0, "add_difference", (("alpha", 10.0),), tuple(ref(s, "F32", (4,)) for s in "abc"), "F32", (4,))
    chunk = ChunkIn("value", 0, 4, [raw(big), raw(big), raw(-big)])
    with pytest.raises(OutputError, match=r"'w.weight' \(rules\[0\] \(match '\.\*', op lerp:0.3\)\) comes out with 4 NaN/Inf values"):
        compute(step, chunk, CPU)
    assert compute(step, chunk, WARN).nonfinite == {"output: w.weight": 4}


def test_a_statistics_pass_gives_the_same_partials_whatever_the_chunking():
    """slerp's pass, folded over two chunkings of one tensor, gives the same statistic as over one chunk."""
    a, b = values(7, torch.float32, (3000,)), values(8, torch.float32, (3000,))
    step = Step("w.weight", 0, "slerp", (("t", 0.4),), (ref("a", "F32", (3000,)), ref("b", "F32", (3000,))), "F32", (3000,))
    stat = OPS["slerp"].passes[0]

    def statistic(bounds):
        state = None
        for lo, hi in zip(bounds, bounds[1:]):
            out = compute(step, ChunkIn("stat", lo, hi, [raw(a[lo:hi]), raw(b[lo:hi])]), CPU)
            state = stat.fold(state, out.partial)
        return stat.result(state, step.values)

    whole = statistic([0, 3000])
    assert statistic([0, 7, 1500, 2999, 3000]) == whole
    merged = compute(step, ChunkIn("value", 0, 3000, [raw(a), raw(b)], stats=(whole,)), CPU)
    halves = [compute(step, ChunkIn("value", lo, hi, [raw(a[lo:hi]), raw(b[lo:hi])], stats=(whole,)), CPU).data for lo, hi in ((0, 1234), (1234, 3000))]
    assert torch.cat(halves).equal(merged.data)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_decodes_to_torchs_float32_bit_for_bit(dtype):
    """The fast fp8 decode (through float16) gives torch's own conversion for every one of the 256 patterns:
    zeros of both signs, subnormals, the largest values, infinities (e5m2) and NaN."""
    patterns = torch.arange(256, dtype=torch.uint8).view(dtype)
    want, got = patterns.to(torch.float32), to_float32(patterns)
    assert torch.equal(want.isnan(), got.isnan())
    assert torch.equal(want[~want.isnan()].view(torch.int32), got[~want.isnan()].view(torch.int32))


def test_a_gguf_chunk_is_dequantized_back_only_when_its_written_values_are_observed():
    """Q8_0 bytes are gguf's quantize of the float32 merge either way; the values as written (what diagnostics
    compare) are gguf's dequantize of those bytes, computed only for a run that observes them."""
    import gguf
    import numpy as np

    a, b = values(5, torch.float32, (4, 64)), values(6, torch.float32, (4, 64))
    step = Step("w.weight", 0, "lerp", (("alpha", 0.3),), (ref("a", "F32", (4, 64)), ref("b", "F32", (4, 64))), "Q8_0", (4, 64))
    chunk = ChunkIn("value", 64, 192, [raw(a.view(-1)[64:192]), raw(b.view(-1)[64:192])])
    want = gguf.quants.quantize((a.view(-1)[64:192] * 0.7 + b.view(-1)[64:192] * 0.3).view(2, 64).numpy(), gguf.GGMLQuantizationType.Q8_0)
    seen, unseen = compute(step, chunk, CPU), compute(step, chunk, Checks(torch.device("cpu"), "error", observed=False))
    for out in (seen, unseen):
        assert np.array_equal(out.data.numpy(), want.reshape(-1))
    assert unseen.written is None
    assert np.array_equal(seen.written.numpy(), gguf.quants.dequantize(want, gguf.GGMLQuantizationType.Q8_0).reshape(-1))
