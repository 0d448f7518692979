"""The executor's mechanisms: bounded work in flight, exact byte copies, chunking that changes no bit, and
page-cache release on aligned ranges. Speed and memory at scale are measured by benchmarks/merge_bench.py."""

from __future__ import annotations

import dataclasses
import math
import struct
import weakref

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_state, make_flux, merge, write_recipe
from fluxrecipe import ops as ops_module
from fluxrecipe import writer as writer_module
from fluxrecipe.execute import reader as reader_module
from fluxrecipe.execute.reader import InputFile
from fluxrecipe.writer import RELEASE_ALIGN


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    """A recipe folder of the test's own, on FLUXRECIPE_RECIPE_PATH."""
    folder = tmp_path / "recipes"
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(folder))
    return folder


def lerp_recipe(recipes, schnell, krea, name="lerp", alpha=0.3, dtype="bf16"):
    write_recipe(
        recipes,
        name,
        f"""
sources: {{schnell: {schnell}, krea: {krea}}}
base: krea
rules:
  - {{match: guidance, op: 'take:krea'}}
  - {{match: '.*', op: 'lerp:{alpha}'}}
dtype: {dtype}
""",
    )
    return name


def reference_lerp(schnell, krea, alpha, dtype):
    a, b = load_state(schnell), load_state(krea)
    return {k: (b[k] if "guidance" in k else (a[k].float() * (1.0 - alpha) + b[k].float() * alpha)).to(dtype) for k in b}


class LiveBuffers:
    """Counts the reader's buffers alive at once (a buffer dies when its last reference goes)."""

    def __init__(self, monkeypatch):
        self.live = self.peak = 0
        original = reader_module.Reader.read

        def read(reader, loc, start, stop):
            buf = original(reader, loc, start, stop)
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(buf, self._died)
            return buf

        monkeypatch.setattr(reader_module.Reader, "read", read)

    def _died(self):
        self.live -= 1


@pytest.mark.parametrize("threads, budget", [(1, "16KB"), (3, "40KB")])
def test_work_in_flight_never_exceeds_the_byte_budget(recipes, schnell, krea, tmp_path, monkeypatch, threads, budget):
    """However many chunks a model has, the bytes of work read-but-not-written stay under `in_flight`, and
    the reader's buffers alive at once under the items that budget admits: the bound that keeps memory
    independent of the model."""
    live = LiveBuffers(monkeypatch)
    name = lerp_recipe(recipes, schnell, krea)
    result = merge([f"recipe={name}", f"output={tmp_path / 'out'}", f"threads={threads}", "chunk_elements=256", f"in_flight={budget}"])
    limit = {"16KB": 16_000, "40KB": 40_000}[budget]
    chunks = sum(math.ceil(max(math.prod(t.shape), 1) / 256) for t in load_state(krea).values())
    per_chunk = 256 * (2 * (2 + 4) + 12 + 2)  # two bf16 inputs, their float32 copies, temporaries, the bf16 output
    assert chunks > 10 * (limit // per_chunk)  # the bound is tested, not the size of a small model
    assert limit - per_chunk < result.peak_in_flight <= limit
    assert live.peak <= 2 * (limit // (256 * 2 * 2) + 1)
    assert live.live == 0


def test_memory_bound_does_not_grow_with_the_number_of_blocks(recipes, tmp_path, monkeypatch):
    """A model with 3x the blocks needs 3x the chunks, but the bytes in flight and the buffers alive at once
    stay under the same bound, which depends on the budget only."""
    peaks = []
    for blocks in (1, 3):
        a = make_flux(tmp_path / f"a{blocks}", guidance=False, seed=2, num_layers=blocks, num_single_layers=blocks)
        b = make_flux(tmp_path / f"b{blocks}", guidance=True, seed=3, num_layers=blocks, num_single_layers=blocks, shard="20KB")
        live = LiveBuffers(monkeypatch)
        name = lerp_recipe(recipes, a, b, name=f"blocks{blocks}")
        result = merge([f"recipe={name}", f"output={tmp_path / f'out{blocks}'}", "threads=2", "chunk_elements=128", "in_flight=20KB"])
        peaks.append((result.peak_in_flight, live.peak))
        monkeypatch.undo()
        monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", str(recipes))
    assert all(in_flight <= 20_000 for in_flight, _ in peaks)
    assert max(buffers for _, buffers in peaks) <= 2 * (20_000 // (128 * 2 * 2) + 1)


@pytest.mark.parametrize("chunk", [61, 97, 1000])
def test_chunk_elements_is_exact(recipes, schnell, krea, tmp_path, monkeypatch, chunk):
    """A chunk holds exactly `chunk_elements` elements (the last of a tensor fewer): 61, 97 and 1000 are
    three different chunkings, not one rounded-up size."""
    sizes = []
    original = reader_module.Reader.read

    def read(reader, ref, start, stop):
        sizes.append(stop - start)
        return original(reader, ref, start, stop)

    monkeypatch.setattr(reader_module.Reader, "read", read)
    name = lerp_recipe(recipes, schnell, krea)
    merge([f"recipe={name}", f"output={tmp_path / 'out'}", f"chunk_elements={chunk}", "threads=2"])
    numels = [math.prod(t.shape) for t in load_state(krea).values()]
    expected = sorted(s for n in numels for s in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else []))
    reads_per_chunk = {k: 1 if "guidance" in k else 2 for k in load_state(krea)}
    assert max(sizes) == chunk
    assert len(sizes) == sum(reads_per_chunk[k] * -(-math.prod(t.shape) // chunk) for k, t in load_state(krea).items())
    assert sorted(set(sizes)) == sorted(set(expected))


@pytest.mark.parametrize("chunk", [97, 1 << 20])
@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_chunked_arithmetic_equals_the_whole_tensor_reference(recipes, schnell, krea, tmp_path, chunk, dtype, torch_dtype):
    """Chunks of any size (97 elements cut rows at every offset) give the bits of the whole-tensor float32 formula."""
    name = lerp_recipe(recipes, schnell, krea, name=f"lerp_{dtype}", alpha=0.37, dtype=dtype)
    out = tmp_path / "out"
    merge([f"recipe={name}", f"output={out}", f"chunk_elements={chunk}", "threads=2"])
    got, want = load_state(out), reference_lerp(schnell, krea, 0.37, torch_dtype)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch_dtype and torch.equal(got[key], want[key]), key


def odd_bits_source(folder, like):
    """A copy of `like` whose first tensor holds bit patterns a float round trip could change:
    NaNs with payloads, both infinities, -0.0, subnormals."""
    state = load_state(like)
    key = sorted(state)[0]
    patterns = [0x7FC1, 0xFFA5, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7F81]
    raw = state[key].contiguous().view(torch.int16).flatten().clone()
    raw[: len(patterns)] = torch.tensor([struct.unpack("<h", struct.pack("<H", p))[0] for p in patterns], dtype=torch.int16)
    state[key] = raw.view(torch.bfloat16).reshape(state[key].shape)
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((like / "config.json").read_text())
    return folder, key


@pytest.mark.parametrize("diagnostics", [True, False])
def test_take_in_the_same_dtype_copies_bytes_undecoded(recipes, krea, tmp_path, monkeypatch, diagnostics):
    """`take` into the source's dtype writes the very bytes it read, NaN payloads and -0.0 included,
    and never calls an op."""
    src, key = odd_bits_source(tmp_path / "odd", krea)
    def no_arithmetic(xs, source):
        raise AssertionError("take in the same dtype decoded and computed")

    monkeypatch.setitem(ops_module.OPS, "take", dataclasses.replace(ops_module.OPS["take"], fn=no_arithmetic))
    write_recipe(recipes, "copy", f"sources: {{odd: {src}}}\nrules: [{{match: '.*', op: 'take:odd'}}]\n")
    out = tmp_path / "out"
    merge(["recipe=copy", f"output={out}", f"diagnostics={str(diagnostics).lower()}", "nonfinite=warn", "chunk_elements=37"])
    got, want = load_state(out), load_state(src)
    for k in want:
        assert got[k].view(torch.int16).equal(want[k].view(torch.int16)), k
    assert got[key].view(torch.int16).flatten()[0].item() == 0x7FC1


def test_input_release_covers_what_was_read_in_any_order_and_is_aligned(monkeypatch):
    """A finished read releases the RELEASE_ALIGN blocks it touches that lie wholly inside what has been read
    so far: never a block part of which is still unread (another read may be bringing it in), and every
    block once all of it is read, whatever the order of the reads (an output layout that is not the
    source's reads ahead and back). Up to READAHEAD_REACH past the read, blocks read before are released
    again (the kernel's read-ahead brings them back), unread ones are not (they are read-ahead to be used)."""
    monkeypatch.setattr(reader_module, "READAHEAD_REACH", 0)
    f = InputFile(fd=-1)
    mib = 1 << 20
    released = []

    def done(begin, end):
        ranges = f.done(begin, end)
        released.extend(ranges)
        return ranges

    assert done(3 * mib + 100, 6 * mib + 100) == [(4 * mib, 6 * mib)]  # [2, 4) MiB holds unread bytes
    assert done(100, 3 * mib + 100) == [(2 * mib, 4 * mib)]  # [0, 100) is unread (a header): not [0, 2) MiB
    assert done(0, 100) == [(0, 2 * mib)]
    assert done(9 * mib, 11 * mib) == []  # ahead, with a gap before it and only part of [8, 10) MiB
    assert done(6 * mib + 100, 9 * mib) == [(6 * mib, 10 * mib)]  # fills the gap: what lies between is whole now
    assert (f.starts, f.ends) == ([0], [11 * mib])
    assert done(mib, 3 * mib) == [(0, 4 * mib)]  # read again (a second pass): its own blocks again
    assert done(20 * mib, 30 * mib) == [(20 * mib, 30 * mib)] and (f.starts, f.ends) == ([0, 20 * mib], [11 * mib, 30 * mib])

    monkeypatch.setattr(reader_module, "READAHEAD_REACH", 16 * mib)
    # read-ahead past [0, 2) MiB reaches [2, 11) (read before: released again) and [20, 30) only up to 18 MiB
    assert done(0, 2 * mib) == [(0, 10 * mib)]
    assert done(12 * mib, 14 * mib) == [(12 * mib, 14 * mib), (20 * mib, 30 * mib)]  # the unread gap before 20 MiB stays
    assert all(x % RELEASE_ALIGN == 0 for r in released for x in r)


def test_bytes_the_plan_never_reads_count_as_read():
    """A LoRA's alpha scalars lie between its matrices, a header before the first tensor: no read covers them,
    so without counting them as done no block around them would ever be released."""
    mib = 1 << 20
    planned = [(100, mib), (mib + 4, 3 * mib), (5 * mib, 6 * mib)]  # 4 bytes of an alpha at 1 MiB; a dropped tensor
    assert reader_module.gaps(planned, 7 * mib) == [(0, 100), (mib, mib + 4), (3 * mib, 5 * mib), (6 * mib, 7 * mib)]
    assert reader_module.gaps([(0, 10), (5, 20)], 20) == []
    f = InputFile(fd=-1)
    for begin, end in reader_module.gaps(planned, 7 * mib):
        f.done(begin, end)
    assert f.done(100, mib) == []  # [0, 2) MiB still holds unread planned bytes
    assert f.done(mib + 4, 3 * mib) == [(0, 4 * mib)]  # [0, 5) MiB is done now; [4, 6) MiB still holds the planned [5, 6)


def test_written_pages_are_released_on_aligned_ranges(tmp_path, monkeypatch):
    """Every range the writer hands to POSIX_FADV_DONTNEED starts and ends on RELEASE_ALIGN, and the file
    is released as it grows, not only at the end."""
    calls = []
    real = writer_module.os.posix_fadvise
    monkeypatch.setattr(writer_module.os, "posix_fadvise", lambda fd, off, n, advice: (calls.append((off, n, advice)), real(fd, off, n, advice))[1])
    f = writer_module.StreamingFile(tmp_path / "big.bin")
    block = bytes(range(256)) * 4099  # not a divisor of anything aligned
    while f.size < 6 * writer_module.FLUSH_WINDOW:
        f.write(block)
    assert any(off == 0 and n > 0 for off, n, _ in calls)  # released while writing
    for off, n, advice in calls:
        assert advice == writer_module.os.POSIX_FADV_DONTNEED
        assert off % RELEASE_ALIGN == 0 and n % RELEASE_ALIGN == 0
    record = f.close()
    assert record.size == (tmp_path / "big.bin").stat().st_size
