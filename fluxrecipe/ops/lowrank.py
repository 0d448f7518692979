"""Low-rank arithmetic on LoRA factors, computed in float64 and reproducible to the bit: LoRAs merged exactly
into one, the best rank-R approximation of a sum of LoRAs from their small factors alone (never an out x in
matrix), ranks chosen by energy, and a large matrix factored from row blocks streamed past it.

Reproducible: the same inputs give the same bytes whatever torch's thread count, OMP_NUM_THREADS or the
machine's core count. MKL's QR, SVD and matrix products split their work by the number of threads and round
differently for each split (a 32 x 32 SVD already does), and torch's reductions cut their input by thread
too. So every LAPACK/BLAS call here runs on one thread (`single_threaded`); a product over a large matrix is
cut into blocks of rows fixed by its width (BLOCK_ELEMENTS, aligned to row 0, whatever chunks the rows
arrive in), each block a fresh float64 copy (MKL's rounding also depends on memory alignment), and the
blocks' partial results are added in block order. Parallelism is several blocks at once on Python threads,
each single-threaded: it changes the time, never the bits. (The bits do depend on the CPU's instruction
set, from which MKL picks its kernels: MKL_CBWR, set before torch starts, pins that, at some speed.)

Factors come out in float32, the engine's working dtype; the singular values and errors in float64.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

BLOCK_ELEMENTS = 1 << 20  # elements per block of rows (8 MiB in float64): the unit of a streamed product
OVERSAMPLE = 8  # the randomized range finder's dimensions beyond the rank
ITERATIONS = 5  # its passes of A^T A: as close to the optimum as svd_lowrank with 4 power iterations (tests state the bound)
NORMAL = -125  # frexp's exponent of float32's smallest normal number, 2**-126

Rows = Callable[[], Iterable[torch.Tensor]]  # a matrix as chunks of whole rows, top to bottom; each call is a new pass

F64 = torch.float64


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch (OpenMP, MKL) on one thread in the calling thread, as it was afterwards. torch keeps the count
    per thread (a thread started later begins with the last count set anywhere), so the workers of a pool
    may each enter this at the same time: no lock, and other threads keep their own count."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class Term:
    """One LoRA on one module: scale * up @ down, scale = strength * alpha / rank with any per-block strength
    already resolved for the module."""

    up: torch.Tensor  # out x r
    down: torch.Tensor  # r x in
    scale: float


@dataclass(frozen=True)
class LowRank:
    """up @ down (float32: out x rank, rank x in) approximating a matrix, with the singular values it was cut
    from (float64, descending: every one for an exact method, the top rank + OVERSAMPLE estimates for the
    streamed one) and ||matrix - up @ down||_F / ||matrix||_F of the float64 factors (0 for a zero matrix).
    The singular values are split evenly, sqrt(s) into each factor. `held`: the components that are singular
    vectors; the rank - held after them are zeros (a rank asked for beyond what the matrix has)."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
    relative_error: float
    held: int

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def concatenate(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact merge of LoRAs on one module: up (out x sum r) and down (sum r x in), float32, with
    up @ down = sum(scale * up_i @ down_i). Write it with alpha = its rank.

    alpha = rank makes every reader's ratio (kohya's alpha / dim, PEFT's lora_alpha / r) exactly 1, so what a
    reader applies is up @ down itself; any other alpha is rounded into the file and divided again. So each
    scale goes into the factors: into up, s * up in float64 rounded once to float32 (exact when s is a power
    of two, and always within float32's half-ulp, far below bf16's). Rounding to bf16 or fp16 is relative
    wherever the scale sits, except at the edges of fp16's narrow range: so each component (a column of up
    and its row of down) is then moved by a power of two towards equal magnitudes (`_balance`), which rounds
    nothing (the mantissas stay as they are) and keeps alpha / rank = 1/128 from leaving up subnormal in
    fp16. Cost: O((out + in) * sum r), no arithmetic beyond the scaling."""
    _shape(terms)
    ups, downs = [], []
    for t in terms:
        up, down = t.up.to(F64) * float(t.scale), t.down.to(F64)
        shift = _balance(up, down)
        ups.append(torch.ldexp(up, -shift))
        downs.append(torch.ldexp(down, shift[:, None]))
    return torch.cat(ups, 1).float(), torch.cat(downs, 0).float()


def _balance(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Per component, the power of two k that up * 2**-k and down * 2**k bring within a factor of 4 of each
    other at their largest, limited so that no nonzero element leaves float32's normal range (where the
    shift would change a bit); 0 for a component that is zero on either side."""
    big_up, small_up, some_up = _exponents(up.abs().mT)
    big_down, small_down, some_down = _exponents(down.abs())
    shift = torch.div(big_up - big_down, 2, rounding_mode="floor")
    least, most = NORMAL - small_down, small_up - NORMAL
    shift = torch.minimum(torch.maximum(shift, least), most)
    return torch.where((least <= most) & some_up & some_down, shift, 0)


def _exponents(magnitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the frexp exponents of its largest and of its smallest nonzero magnitude, and whether it has one."""
    largest = magnitudes.amax(1)
    smallest = torch.where(magnitudes > 0, magnitudes, torch.finfo(F64).max).amin(1)
    return torch.frexp(largest).exponent, torch.frexp(smallest).exponent, largest > 0


def truncate(terms: Sequence[Term], rank: int, energy: float | None = None) -> LowRank:
    """The best rank-`rank` approximation of sum(scale * up_i @ down_i) (with `energy`: of the smallest rank
    up to `rank` that keeps that fraction of its squared norm), from the factors alone: QR of the stacked ups
    (out x K, K = sum r_i) and of the stacked downs^T (in x K), so the sum is Q_up (R_up diag(scales) R_down^T)
    Q_down^T, then an SVD of that small core, cut (Eckart-Young: the best in the Frobenius and spectral norms).
    The error comes from the singular values cut away, exactly. A rank beyond what the sum has
    (min(K, out, in)) gives its exact factors, padded with zeros to that rank. A resize is this with one term.
    Cost: about 4 (out + in) K^2 flops for the QRs, O(K^3) for the core, 2 (out + in) K rank for the factors;
    memory O((out + in) K) in float64."""
    _shape(terms)
    with single_threaded():
        ups = torch.cat([t.up.to(F64) for t in terms], 1)
        downs = torch.cat([t.down.to(F64) for t in terms], 0)
        scales = torch.cat([torch.full((t.up.shape[1],), float(t.scale), dtype=F64) for t in terms])
        q_up, r_up = torch.linalg.qr(ups)
        q_down, r_down = torch.linalg.qr(downs.mT)
        u, s, vh = torch.linalg.svd((r_up * scales) @ r_down.mT, full_matrices=False)
        kept = _rank(s, rank, energy)
        held = min(kept, s.numel())
        return _lowrank(q_up @ u[:, :held], s, vh[:held] @ q_down.mT, kept)


def svd_factor(matrix: torch.Tensor, rank: int, energy: float | None = None) -> LowRank:
    """The truncated SVD of a matrix held in memory (LAPACK, float64, one thread), cut as `truncate` cuts.
    Cost: O(m n min(m, n)) flops, three float64 copies of the matrix's size; for the smaller matrices."""
    with single_threaded():
        u, s, vh = torch.linalg.svd(matrix.to("cpu", F64), full_matrices=False)
        kept = _rank(s, rank, energy)
        held = min(kept, s.numel())
        return _lowrank(u[:, :held], s, vh[:held], kept)


def streamed_factor(
    rows: Rows, shape: tuple[int, int], rank: int, seed: int, *, energy: float | None = None,
    oversample: int = OVERSAMPLE, iterations: int = ITERATIONS, threads: int = 1,
) -> LowRank:
    """A rank-`rank` factorisation of an m x n matrix that is never held: a randomized range finder over its
    rows, iterations + 1 passes of `rows()`. The start is a Gaussian n x w basis (w = rank + oversample, seeded
    by `seed`: per key, for the same bits every time); each iteration is one pass computing A^T A basis block
    by block (sum of A_b^T (A_b basis)), then a QR: subspace iteration towards the top right singular vectors.
    A last pass computes Y = A basis and ||A||^2; the SVD of Y (m x w) gives the factors, cut as `truncate`
    cuts, and the error sqrt(||A||^2 - sum of the kept s^2) / ||A|| (float64: meaningful down to ~1e-7).
    `threads` Python threads compute blocks at once; the result does not depend on them.
    Cost: (4 iterations + 2) m n w flops; memory, in float64: the m x w image and its SVD, a few n x w
    matrices, 2 x threads + 1 blocks of BLOCK_ELEMENTS (lowrank_bench.py --streamed measures FLUX.2 dev's
    55296 x 6144 at rank 64)."""
    m, n = shape
    if iterations < 1:
        raise ValueError(f"iterations={iterations}: the range finder needs at least one pass of A^T A")
    width = min(rank + oversample, m, n)
    basis = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with single_threaded():
        for _ in range(iterations):
            gram = torch.zeros(n, width, dtype=F64)
            for _, partial in _map_blocks(lambda _, block: block.mT @ (block @ basis), rows, shape, threads):
                gram += partial
            basis = torch.linalg.qr(gram).Q
        image, squares = torch.empty(m, width, dtype=F64), []
        for first, (part, square) in _map_blocks(lambda _, block: (block @ basis, _square(block)), rows, shape, threads):
            image[first : first + part.shape[0]] = part
            squares.append(square)
        u, s, vh = torch.linalg.svd(image, full_matrices=False)
        total = math.fsum(squares)
        kept = _rank(s, rank, energy, total)
        held = min(kept, s.numel())
        return _lowrank(u[:, :held], s, vh[:held] @ basis.mT, kept, total)


def residual_error(rows: Rows, shape: tuple[int, int], up: torch.Tensor, down: torch.Tensor, threads: int = 1) -> float:
    """||A - up @ down||_F / ||A||_F for a streamed m x n matrix A, block by block in float64 (one more pass;
    no second matrix of A's size); 0 for a zero A with zero factors, inf for a zero A with others."""
    up, down = up.to(F64), down.to(F64)
    residual, total = [], []
    for first, (square, norm) in _map_blocks(lambda first, block: (_square(block - up[first : first + block.shape[0]] @ down), _square(block)), rows, shape, threads):
        residual.append(square)
        total.append(norm)
    norm = math.fsum(total)
    return math.sqrt(math.fsum(residual) / norm) if norm else (0.0 if not math.fsum(residual) else math.inf)


def energy_rank(singular_values: torch.Tensor, energy: float, cap: int, total: float | None = None) -> int:
    """The smallest rank whose singular values keep a fraction `energy` (0 < E <= 1) of the squared
    Frobenius norm `total` (by default the sum of their squares: they are all of them), at most `cap`;
    0 for a zero matrix. Sums run left to right in Python floats: no thread decides a rank."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy={energy}: must be above 0 and at most 1")
    kept = list(itertools.accumulate(x * x for x in singular_values.to(F64).tolist()))
    total = (kept[-1] if kept else 0.0) if total is None else total
    if not total:
        return 0
    return min(cap, bisect.bisect_left(kept, energy * total) + 1)


def _rank(s: torch.Tensor, rank: int, energy: float | None, total: float | None = None) -> int:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank}: must be a whole number above 0")
    return rank if energy is None else energy_rank(s, energy, rank, total)


def _lowrank(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor, rank: int, total: float | None = None) -> LowRank:
    """The LowRank of left (m x held) diag(s[:held]) right (held x n), zero-padded to `rank` components.
    total: ||A||^2 when s holds only some of A's singular values (the error is then what s leaves of it)."""
    held = left.shape[1]
    root = s[:held].sqrt()
    up = torch.zeros(left.shape[0], rank, dtype=torch.float32)
    down = torch.zeros(rank, right.shape[1], dtype=torch.float32)
    up[:, :held] = left * root
    down[:held] = root[:, None] * right
    squares = [x * x for x in s.tolist()]
    if total is None:
        total, lost = math.fsum(squares), math.fsum(squares[held:])
    else:
        lost = max(total - math.fsum(squares[:held]), 0.0)
    return LowRank(up, down, s, math.sqrt(lost / total) if total else 0.0, held)


def _shape(terms: Sequence[Term]) -> tuple[int, int]:
    """(out, in) of the module the terms share."""
    if not terms:
        raise ValueError("no LoRA to merge")
    out, width = terms[0].up.shape[0], terms[0].down.shape[1]
    for t in terms:
        if t.up.dim() != 2 or t.down.dim() != 2 or t.up.shape != (out, t.down.shape[0]) or t.down.shape[1] != width:
            raise ValueError(f"factors of shapes {tuple(t.up.shape)} and {tuple(t.down.shape)} on a module of {out} x {width}")
        if not math.isfinite(t.scale):
            raise ValueError(f"scale {t.scale}: must be finite")
    return out, width


def _square(block: torch.Tensor) -> float:
    flat = block.reshape(-1)
    return float(torch.dot(flat, flat))


def block_rows(width: int) -> int:
    """Rows of a block: a fixed function of the matrix's width, so every cut of the same matrix is the same."""
    return max(1, BLOCK_ELEMENTS // width)


def _blocks(rows: Rows, shape: tuple[int, int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) over the matrix: fresh float64 blocks of block_rows(n) rows from row 0, the last one
    shorter, whatever the heights of the chunks `rows()` yields."""
    m, n = shape
    size = block_rows(n)
    block, filled, first = torch.empty(min(size, m), n, dtype=F64), 0, 0
    for chunk in rows():
        if chunk.dim() != 2 or chunk.shape[1] != n:
            raise ValueError(f"a chunk of shape {tuple(chunk.shape)} from a matrix of {m} x {n}")
        while chunk.shape[0]:
            if first + filled == m:
                raise ValueError(f"more than {m} rows from a matrix of {m} x {n}")
            take = min(chunk.shape[0], block.shape[0] - filled)
            block[filled : filled + take] = chunk[:take]
            filled, chunk = filled + take, chunk[take:]
            if filled == block.shape[0]:
                yield first, block
                first += filled
                block, filled = torch.empty(min(size, m - first), n, dtype=F64), 0
    if first != m:
        raise ValueError(f"{first + filled} rows from a matrix of {m} x {n}")


def _map_blocks(work: Callable, rows: Rows, shape: tuple[int, int], threads: int) -> Iterator[tuple[int, object]]:
    """(first row, work(first row, block)) for every block, in order; `threads` blocks at once on threads of their own,
    each single-threaded in torch, at most 2 threads blocks held."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="fluxrecipe-lowrank") as pool:
        pending: deque = deque()
        for first, block in _blocks(rows, shape):
            pending.append((first, pool.submit(_alone, work, first, block)))
            if len(pending) >= 2 * max(1, threads):
                first, done = pending.popleft()
                yield first, done.result()
        while pending:
            first, done = pending.popleft()
            yield first, done.result()


def _alone(work: Callable, *args):
    with single_threaded():
        return work(*args)
