"""The arithmetic of LoRAs in float32: a LoRA's product for some rows of a weight, and a difference factored
back into a LoRA by a truncated SVD.

A matrix product's float32 rounding depends on how a BLAS library splits it (MKL, for one, computes a call of
1 to 3 rows otherwise than the same rows inside a larger call), so a product computed per chunk could change
with the chunk size. Here a product is always computed in blocks of ROWS rows of the weight, aligned to the
weight's row 0, each block by one call of the same shape on fresh, aligned memory: the bits depend on the
tensors alone. (A block of the weight's full height, or of 64 of its rows, gives what one product over the
whole weight gives, as diffusers/PEFT compute it when they fuse a LoRA, wherever the library treats every
call of 4 or more rows alike: MKL does; tests check it.)
"""

from __future__ import annotations

import math

import torch

ROWS = 64  # rows of a weight per product call: a patched step's chunks are whole blocks of these
OVERSAMPLE = 8  # svd_lowrank's extra dimensions beyond the rank, and its power iterations:
POWER_ITERATIONS = 4  # enough to find a difference of rank <= R to float32 precision


def product_rows(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down, for up = whole blocks of ROWS rows of a LoRA's up (the last block of a weight may be
    shorter), block by block, each into its rows of the result."""
    out = torch.empty(up.shape[0], down.shape[1], dtype=up.dtype, device=up.device)
    for i in range(0, up.shape[0], ROWS):
        torch.matmul(up[i : i + ROWS], down, out=out[i : i + ROWS])
    return out


def factor(diff: torch.Tensor, rank: int, exact: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down the best rank-`rank` approximation of `diff` (m x n): the truncated SVD,
    its singular values split evenly between the two. Exact (LAPACK) or randomized (`torch.svd_lowrank`,
    seeded: the same difference gives the same factors)."""
    if exact:
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
    else:
        devices = [diff.device.index or 0] if diff.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(diff, q=min(rank + OVERSAMPLE, *diff.shape), niter=POWER_ITERATIONS)
        vh = v.mT
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def relative_error(diff: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||diff - up @ down|| / ||diff|| (Frobenius), over blocks of about a million elements (no second
    whole-size matrix); 0 for a zero difference written as zeros."""
    residual, total = [], []
    rows = max(1, (1 << 20) // diff.shape[1])
    for i in range(0, diff.shape[0], rows):
        block = diff[i : i + rows]
        residual.append(float(torch.linalg.vector_norm(block - up[i : i + rows] @ down, dtype=torch.float64) ** 2))
        total.append(float(torch.linalg.vector_norm(block, dtype=torch.float64) ** 2))
    norm = math.fsum(total)
    return math.sqrt(math.fsum(residual) / norm) if norm else (0.0 if not math.fsum(residual) else math.inf)
