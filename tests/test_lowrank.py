"""The low-rank arithmetic of the LoRA toolkit (issue 19, fluxrecipe/ops/lowrank.py), each result against a
float64 reference on the full matrix written here: the exact merge of LoRAs, the best rank-R approximation of
their sum from the factors alone, resizes, energy ranks, the streamed randomized factorisation and its error
bound; and the same bytes whatever the threads, for these and for a real extraction (recipe=extract_lora)."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, config_of, run_cli, save_sharded


# --- references ----------------------------------------------------------------------------------------------

F64 = torch.float64


def lora(out: int, width: int, rank: int, seed: int, dtype=torch.float32, size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, rank, generator=g) * size).to(dtype), (torch.randn(rank, width, generator=g) * size).to(dtype)


def summed(terms) -> torch.Tensor:
    """sum(scale * up @ down) in float64: the full matrix the factors stand for."""
    return sum(t.scale * (t.up.to(F64) @ t.down.to(F64)) for t in terms)


def optimal_error(matrix: torch.Tensor, rank: int) -> float:
    """The truncated SVD's relative error (Eckart-Young), from a float64 SVD of the whole matrix."""
    s = torch.linalg.svdvals(matrix.to(F64))
    return math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


def error_of(matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    matrix = matrix.to(F64)
    return float((matrix - up.to(F64) @ down.to(F64)).norm() / matrix.norm())


def with_spectrum(m: int, n: int, spectrum: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 factors U diag(spectrum) (m x k) and V^T (k x n) with random orthonormal U, V: the singular
    values of their product are `spectrum` (to float32's rounding of the factors)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=F64)).Q
    return (u * torch.tensor(spectrum, dtype=F64)).float(), v.mT.float()


def product(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (factors[0].to(F64) @ factors[1].to(F64)).float()


# --- the exact merge -----------------------------------------------------------------------------------------


def test_concatenation_is_the_sum_of_the_products():
    """Three LoRAs of ranks 3, 5, 2 (fp32, bf16, fp16) with scales 0.37, -1.25 and 2**-7: rank 10, and
    up @ down is the sum of the scaled products to float32's rounding of scale * up."""
    from fluxrecipe.ops.lowrank import Term, concatenate

    terms = [Term(*lora(24, 40, 3, 1), 0.37), Term(*lora(24, 40, 5, 2, torch.bfloat16), -1.25), Term(*lora(24, 40, 2, 3, torch.float16), 2**-7)]
    up, down = concatenate(terms)
    assert up.dtype == down.dtype == torch.float32 and up.shape == (24, 10) and down.shape == (10, 40)
    want = summed(terms)
    assert float((up.to(F64) @ down.to(F64) - want).abs().max() / want.abs().max()) < 1e-7


def test_concatenation_moves_only_powers_of_two():
    """With power-of-two scales nothing is rounded: each component's outer product (exact in float64, a
    product of two float32 numbers) equals scale * up_j down_j^T bit for bit, and the components are
    rebalanced (up was 2**10 times larger than down: now within a factor of 4)."""
    from fluxrecipe.ops.lowrank import Term, concatenate

    a_up, a_down = lora(16, 20, 3, 4)
    b_up, b_down = lora(16, 20, 2, 5)
    terms = [Term(a_up * 1024, a_down, 0.5), Term(b_up, b_down, -4.0)]
    up, down = concatenate(terms)
    originals = [(t.scale * t.up[:, j].to(F64), t.down[j].to(F64)) for t in terms for j in range(t.up.shape[1])]
    for j, (u, d) in enumerate(originals):
        assert torch.equal(torch.outer(up[:, j].to(F64), down[j].to(F64)), torch.outer(u, d)), j
        assert 0.25 <= float(up[:, j].abs().max() / down[j].abs().max()) <= 4, j


def test_balancing_keeps_fp16_from_going_subnormal():
    """alpha / rank = 1/128 on an up of magnitude 1e-3: scale * up (~1e-5) would be subnormal in fp16 (0.7%
    steps); balanced, both factors round to fp16 at its 11-bit precision."""
    from fluxrecipe.ops.lowrank import Term, concatenate

    up, down = lora(32, 48, 4, 6)
    terms = [Term(up * 1e-3, down * 2e-2, 1 / 128)]
    up, down = concatenate(terms)
    want = summed(terms)
    naive = (terms[0].up.to(F64) / 128).half().to(F64) @ terms[0].down.half().to(F64)
    balanced = up.half().to(F64) @ down.half().to(F64)
    assert float((naive - want).norm() / want.norm()) > 2e-3  # what balancing avoids
    assert float((balanced - want).norm() / want.norm()) < 1e-3


# --- the best rank-R approximation from the factors -----------------------------------------------------------


@pytest.mark.parametrize("shape, ranks, rank", [((40, 56), (6, 10), 5), ((12, 30), (8, 8), 7), ((50, 9), (4, 7), 3)], ids=["tall-core", "more-rank-than-rows", "narrow"])
def test_truncation_error_is_the_optimal_truncated_svd_error(shape, ranks, rank):
    """Two LoRAs (kohya-like and PEFT-like scales) summed and cut to rank R from the factors alone: the stated
    error, and the true error of the float32 factors, are the truncated SVD's of the summed matrix; the
    singular values are the summed matrix's."""
    from fluxrecipe.ops.lowrank import Term, truncate

    out, width = shape
    terms = [Term(*lora(out, width, ranks[0], 7), 16 / ranks[0]), Term(*lora(out, width, ranks[1], 8, torch.bfloat16), -0.6)]
    result = truncate(terms, rank)
    want = summed(terms)
    optimal = optimal_error(want, rank)
    assert result.rank == result.held == rank and result.up.shape == (out, rank) and result.down.shape == (rank, width)
    assert abs(result.relative_error - optimal) < 1e-12 * max(1.0, optimal)
    assert abs(error_of(want, result.up, result.down) - optimal) < 1e-6
    s = torch.linalg.svdvals(want)
    assert result.singular_values.shape[0] == min(out, width, sum(ranks))
    assert torch.allclose(result.singular_values, s[: result.singular_values.shape[0]], rtol=1e-10, atol=1e-12 * float(s[0]))


def test_resize_down_and_up():
    """One LoRA of rank 8: resized to 3 it is its truncated SVD; resized to 12 it is exact, its 8 components
    followed by 4 zero columns of up and zero rows of down."""
    from fluxrecipe.ops.lowrank import Term, truncate

    term = Term(*lora(30, 44, 8, 9), 0.25)
    want = summed([term])
    down_to = truncate([term], 3)
    assert down_to.rank == 3 and abs(error_of(want, down_to.up, down_to.down) - optimal_error(want, 3)) < 1e-6
    up_to = truncate([term], 12)
    assert up_to.rank == 12 and up_to.held == 8 and up_to.relative_error == 0.0
    assert not up_to.up[:, 8:].any() and not up_to.down[8:].any()
    assert error_of(want, up_to.up, up_to.down) < 1e-6


def test_a_zero_sum():
    """A LoRA at strength 0 and one whose up is still zero (as training starts): zero factors, error 0, and
    energy keeps rank 0 (nothing to write)."""
    from fluxrecipe.ops.lowrank import Term, truncate

    up, down = lora(10, 14, 3, 10)
    terms = [Term(up, down, 0.0), Term(torch.zeros(10, 2), down[:2], 1.0)]
    result = truncate(terms, 2)
    assert result.relative_error == 0.0 and not result.up.any() and not result.down.any()
    assert truncate(terms, 2, energy=0.9).rank == 0


# --- energy ---------------------------------------------------------------------------------------------------

SPECTRUM = [4.0, 2.0, 1.0, 0.5]  # squares 16, 4, 1, 0.25 of 21.25: 75.3%, 94.1%, 98.8%, 100% kept


@pytest.mark.parametrize("energy, cap, rank", [(0.7, 4, 1), (0.76, 4, 2), (0.95, 4, 3), (0.99, 4, 4), (1.0, 4, 4), (0.99, 2, 2), (0.5, 9, 1)])
def test_energy_picks_the_ranks_the_singular_values_say(energy, cap, rank):
    """The smallest rank keeping `energy` of the squared norm, at most `cap`: the same from the factors
    (truncate), from the matrix (svd_factor) and streamed (streamed_factor), and its error is what is left."""
    from fluxrecipe.ops.lowrank import Term, energy_rank, streamed_factor, svd_factor, truncate

    assert energy_rank(torch.tensor(SPECTRUM, dtype=F64), energy, cap) == rank
    factors = with_spectrum(20, 26, SPECTRUM, 11)
    matrix = product(factors)
    left = sum(x * x for x in SPECTRUM[rank:]) / sum(x * x for x in SPECTRUM)
    for result in (truncate([Term(*factors, 1.0)], cap, energy), svd_factor(matrix, cap, energy), streamed_factor(lambda: (matrix,), (20, 26), cap, 0, energy=energy)):
        assert result.rank == result.held == rank
        assert abs(result.relative_error - math.sqrt(left)) < 1e-6


def test_energy_out_of_range():
    from fluxrecipe.ops.lowrank import energy_rank

    for energy in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match="energy="):
            energy_rank(torch.ones(3), energy, 3)


# --- the streamed factorisation ---------------------------------------------------------------------------------


def chunks_of(matrix: torch.Tensor, heights: list[int]):
    """matrix as row chunks of the given heights, repeated to the bottom."""

    def rows():
        at, i = 0, 0
        while at < matrix.shape[0]:
            yield matrix[at : at + heights[i % len(heights)]]
            at += heights[i % len(heights)]
            i += 1

    return rows


def test_streamed_factor_recovers_a_known_rank_whatever_the_chunks(monkeypatch):
    """A rank-6 matrix of 500 x 300 at rank 8, in blocks of 64 rows: exact to float32 precision, the stated
    error near 0, and the same bytes whether the rows come as one chunk or as chunks of 37, 100 and 1 rows."""
    from fluxrecipe.ops import lowrank

    monkeypatch.setattr(lowrank, "BLOCK_ELEMENTS", 64 * 300)
    g = torch.Generator().manual_seed(13)
    matrix = torch.randn(500, 6, generator=g) @ torch.randn(6, 300, generator=g)
    whole = lowrank.streamed_factor(lambda: (matrix,), (500, 300), 8, seed=1)
    assert whole.relative_error < 1e-7 and error_of(matrix, whole.up, whole.down) < 1e-6
    chunked = lowrank.streamed_factor(chunks_of(matrix, [37, 100, 1]), (500, 300), 8, seed=1)
    assert torch.equal(whole.up, chunked.up) and torch.equal(whole.down, chunked.down) and whole.relative_error == chunked.relative_error


@pytest.mark.parametrize("spectrum", ["1/sqrt(i)", "1/i", "0.9**i"])
def test_streamed_factor_is_within_its_bound_of_the_optimum(monkeypatch, spectrum):
    """Decaying spectra over 400 singular values, rank 16: the error of the streamed factors is within 0.05%
    of the truncated SVD's (the default 5 iterations), and the stated error is the true one."""
    from fluxrecipe.ops import lowrank

    monkeypatch.setattr(lowrank, "BLOCK_ELEMENTS", 50 * 400)
    values = {"1/sqrt(i)": lambda i: (i + 1) ** -0.5, "1/i": lambda i: 1 / (i + 1), "0.9**i": lambda i: 0.9**i}[spectrum]
    matrix = product(with_spectrum(900, 400, [values(i) for i in range(400)], 14))
    result = lowrank.streamed_factor(chunks_of(matrix, [128]), (900, 400), 16, seed=2)
    true = error_of(matrix, result.up, result.down)
    assert true <= 1.0005 * optimal_error(matrix, 16)  # 1.00015 at worst here; 3 iterations give 1.0011
    assert abs(result.relative_error - true) < 1e-8


def test_residual_error_is_the_relative_error(monkeypatch):
    from fluxrecipe.ops import lowrank

    monkeypatch.setattr(lowrank, "BLOCK_ELEMENTS", 30 * 50)
    g = torch.Generator().manual_seed(15)
    matrix, up, down = torch.randn(200, 50, generator=g), torch.randn(200, 4, generator=g), torch.randn(4, 50, generator=g)
    assert abs(lowrank.residual_error(chunks_of(matrix, [33]), (200, 50), up, down) - error_of(matrix, up, down)) < 1e-14
    assert lowrank.residual_error(lambda: (torch.zeros(200, 50),), (200, 50), torch.zeros(200, 4), down) == 0.0
    assert lowrank.residual_error(lambda: (torch.zeros(200, 50),), (200, 50), up, down) == math.inf


def test_a_source_of_the_wrong_shape_is_refused():
    from fluxrecipe.ops.lowrank import Term, residual_error, streamed_factor, truncate

    matrix = torch.ones(10, 6)
    with pytest.raises(ValueError, match="rows from a matrix of 12 x 6"):
        streamed_factor(lambda: (matrix,), (12, 6), 2, 0)
    with pytest.raises(ValueError, match="more than 8 rows"):
        residual_error(lambda: (matrix,), (8, 6), torch.ones(8, 1), torch.ones(1, 6))
    with pytest.raises(ValueError, match="on a module of 10 x 6"):
        truncate([Term(torch.ones(10, 2), torch.ones(2, 6), 1.0), Term(torch.ones(10, 2), torch.ones(2, 7), 1.0)], 2)
    with pytest.raises(ValueError, match="at least one pass"):
        streamed_factor(lambda: (matrix,), (10, 6), 2, 0, iterations=0)


# --- reproducible whatever the threads -----------------------------------------------------------------------

DIGEST = """
import hashlib, sys, torch
from concurrent.futures import ThreadPoolExecutor
from fluxrecipe.ops import lowrank
from fluxrecipe.ops.lora import factor, relative_error
from fluxrecipe.ops.lowrank import Term, concatenate, streamed_factor, svd_factor, truncate

lowrank.BLOCK_ELEMENTS = 97 * 700  # several blocks of rows, so that blocks are computed at once
g = torch.Generator().manual_seed(16)
terms = [Term(torch.randn(1500, 48, generator=g), torch.randn(48, 700, generator=g), 0.3), Term(torch.randn(1500, 24, generator=g).bfloat16(), torch.randn(24, 700, generator=g).bfloat16(), -1.7)]
matrix = (torch.randn(1500, 90, generator=g) @ torch.randn(90, 700, generator=g)).float()

def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if isinstance(t, torch.Tensor) else repr(t).encode())
    return h.hexdigest()

def everything():
    merged = truncate(terms, 20)
    svd = svd_factor(matrix[:300, :200], 12)
    rows, small = (lambda: (matrix,)), (lambda: (matrix[:300, :200],))
    up, down = factor(rows, tuple(matrix.shape), 16, False, 3)
    return digest([*concatenate(terms), merged.up, merged.down, merged.singular_values, merged.relative_error, truncate(terms, 9, energy=0.5).up,
                   svd.up, svd.down, svd.relative_error, *factor(small, (300, 200), 12, True, 0), up, down, relative_error(rows, tuple(matrix.shape), up, down),
                   streamed_factor(lambda: (matrix,), tuple(matrix.shape), 16, 5, threads=3).up])

for threads in map(int, sys.argv[1:] or ["0"]):  # 0: as the process started
    if threads:
        torch.set_num_threads(threads)
    print(everything())
    with ThreadPoolExecutor(3) as pool:  # as an executor's workers would call it, at once
        print(*set(pool.map(lambda _: everything(), range(3))))
"""


def test_the_same_bytes_whatever_the_threads(monkeypatch):
    """Every function (and ops/lora.py's factor and relative_error) on inputs large enough for MKL to split
    its work: the same bytes under OMP_NUM_THREADS=1, the default and OMP_NUM_THREADS=4, with
    torch.set_num_threads(1), (2) and (4) in one process, and called from three threads at once."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    lines = []
    for env, threads in (({"OMP_NUM_THREADS": "1"}, []), ({}, ["1", "2", "4"]), ({"OMP_NUM_THREADS": "4"}, [])):
        done = subprocess.run([sys.executable, "-c", DIGEST, *threads], env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        lines += done.stdout.split()
    assert len(lines) == 10 and len(set(lines)) == 1, lines


@pytest.fixture(scope="module")
def pair(tmp_path_factory, krea, state_of):
    """krea (float32) as the base, and krea plus a full-rank difference on every weight matrix as the tuned model."""
    state = {k: v.float() for k, v in state_of(krea).items()}
    g = torch.Generator().manual_seed(5)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in state.items()}
    root = tmp_path_factory.mktemp("pair")
    return save_sharded(state, root / "base", [list(state)], config_of(krea)), save_sharded(tuned, root / "tuned", [list(tuned)], config_of(krea))


def test_extraction_bytes_do_not_depend_on_threads(tmp_path, pair, monkeypatch):
    """recipe=extract_lora in subprocesses with 1, the default and 4 OpenMP threads (torch's own, which the
    SVD uses) and with threads=1, 2, 4 (the executor's workers): the same file, byte for byte."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    base, tuned = pair
    runs = {"OMP_NUM_THREADS=1 threads=4": ({"OMP_NUM_THREADS": "1"}, "threads=4"), "default threads=1": ({}, "threads=1"), "OMP_NUM_THREADS=4 threads=2": ({"OMP_NUM_THREADS": "4"}, "threads=2")}
    digests = {}
    for i, (name, (env, threads)) in enumerate(runs.items()):
        out = tmp_path / f"lora{i}.safetensors"
        args = ["recipe=extract_lora", f"recipe.sources.tuned={tuned}", f"recipe.sources.base={base}", "lora_rank=4", threads, f"output={out}", "progress=false"]
        done = run_cli(args, cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        digests[name] = hashlib.sha256(out.read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests
