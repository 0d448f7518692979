"""The arithmetic of LoRAs for the executor: a LoRA's product for some rows of a weight (float32), and a
difference factored back into a LoRA by a truncated SVD (lowrank.py's, reproducible whatever the threads)
from its rows, streamed.

A matrix product's float32 rounding depends on how a BLAS library splits it (MKL, for one, computes a call of
1 to 3 rows otherwise than the same rows inside a larger call), so a product computed per chunk could change
with the chunk size. Here a product is always computed in blocks of ROWS rows of the weight, aligned to the
weight's row 0, each block by one call of the same shape on fresh, aligned memory: the bits depend on the
tensors alone. (A block of the weight's full height, or of 64 of its rows, gives what one product over the
whole weight gives, as diffusers/PEFT compute it when they fuse a LoRA, wherever the library treats every
call of 4 or more rows alike: MKL does; tests check it.)
"""

from __future__ import annotations

import torch

from .lowrank import Rows, residual_error, streamed_factor, svd_factor

ROWS = 64  # rows of a weight per product call: a patched step's chunks are whole blocks of these


def product_rows(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down, for up = whole blocks of ROWS rows of a LoRA's up (the last block of a weight may be
    shorter), block by block, each into its rows of the result."""
    out = torch.empty(up.shape[0], down.shape[1], dtype=up.dtype, device=up.device)
    for i in range(0, up.shape[0], ROWS):
        torch.matmul(up[i : i + ROWS], down, out=out[i : i + ROWS])
    return out


def factor(rows: Rows, shape: tuple[int, int], rank: int, exact: bool, seed: int, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down), float32, with up @ down the best rank-`rank` approximation of the m x n matrix that `rows()`
    yields (lowrank.Rows: chunks of whole rows, a new pass per call), its singular values split evenly between
    the two: the truncated SVD (exact: LAPACK on the whole matrix, gathered) or the randomized range finder
    over its rows, seeded by `seed` (lowrank.py), which never holds it. The same bits whatever the threads and
    however the rows are cut: torch's thread count only sets how many blocks of rows are computed at once. On
    the CPU, wherever the rows are. `energy`: the rank the smallest (at most `rank`) whose singular values keep
    that fraction of the squared norm."""
    if exact:
        chunks = list(rows())
        result = svd_factor(chunks[0] if len(chunks) == 1 else torch.cat(chunks), rank, energy)
    else:
        result = streamed_factor(rows, shape, rank, seed, energy=energy, threads=torch.get_num_threads())
    return result.up, result.down


def relative_error(rows: Rows, shape: tuple[int, int], up: torch.Tensor, down: torch.Tensor) -> float:
    """||A - up @ down|| / ||A|| (Frobenius) for the m x n matrix A that `rows()` yields, in float64 over fixed
    blocks of rows (one more pass, no second whole-size matrix, the same bits whatever the threads); 0 for a
    zero A written as zeros."""
    return residual_error(rows, shape, up, down, threads=torch.get_num_threads())
