"""Benchmark: the low-rank arithmetic of LoRA-space merges and resizes (fluxrecipe/ops/lowrank.py), per module at
FLUX.1's width and over a FLUX.1-sized set of modules, each case in a process of its own in a memory cgroup.

    python benchmarks/lowrank_bench.py                                        # FLUX.1: 19 double + 38 single blocks
    python benchmarks/lowrank_bench.py --double 1 --single 2 --repeat 1       # a smoke run

Random factors (bf16, as LoRA files hold them, magnitude 0.01; making them is not timed):
  merge exact     two rank-64 LoRAs (scales 0.8 and 0.5) -> one LoRA of rank 128 (lowrank.concatenate)
  merge rank 64   the same two cut to the best rank-64 approximation of their sum (lowrank.truncate)
  resize 128->32  one rank-128 LoRA cut to rank 32 (lowrank.truncate, one term)
each per module on a 3072 x 3072 and a 3072 x 12288 (out x in) matrix (the median of --repeat runs), then over
every Linear module of the model, in BFL's names as a kohya LoRA covers it (lora_bench.lora_modules: fused qkv
and linear1 included), --threads modules at once, each single-threaded as lowrank.py runs (the bits do not
depend on --threads). With --streamed, one more case (minutes):
  streamed rank 64  lowrank.streamed_factor on FLUX.2 dev's largest matrix, 55296 x 6144, from rows made on
                    the fly (it is never held: 1.3 GiB in float32), --threads blocks of rows at once
Every case runs under ../shared/tools/memcap (--cap MiB, page cache included) and gives its
peak; the first row, "nothing", is the floor under every peak (the interpreter, torch, diffusers for the model's
module list). Prints one Markdown table: compute seconds (the operation alone, summed over modules), wall
seconds over the model (making the factors included) and peak MiB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_bench import lora_modules
from merge_bench import FLUX, REPO, run_measured

from fluxrecipe.ops.lowrank import Term, concatenate, streamed_factor, truncate

SHAPES = {"3072 x 3072": (3072, 3072), "3072 x 12288": (3072, 12288)}
LARGEST = (55296, 6144)  # FLUX.2 dev's largest matrix: 1.3 GiB in float32


def factors(shape: tuple[int, int], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape[0], rank, generator=g) * 0.01).bfloat16(), (torch.randn(rank, shape[1], generator=g) * 0.01).bfloat16()


def operation(case: str, shape: tuple[int, int], seed: int):
    """The inputs of `case` on a module of `shape`, and the call to time."""
    if case == "resize 128->32":
        term = Term(*factors(shape, 128, seed), 1.0)
        return lambda: truncate([term], 32)
    terms = [Term(*factors(shape, 64, seed), 0.8), Term(*factors(shape, 64, seed + 1), 0.5)]
    return (lambda: concatenate(terms)) if case == "merge exact" else (lambda: truncate(terms, 64))


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def streamed(threads: int) -> dict:
    """streamed_factor at rank 64 on a LARGEST matrix that is never held: chunks of 1024 rows, each a copy of
    one random float32 tile rolled by its index (made per pass; the values do not change the work)."""
    tile = torch.randn(1024, LARGEST[1], generator=torch.Generator().manual_seed(0))

    def rows():
        for i in range(LARGEST[0] // 1024):
            yield tile.roll(i, 1)

    start = time.perf_counter()
    streamed_factor(rows, LARGEST, 64, seed=0, threads=threads)
    return {"compute": time.perf_counter() - start, "modules": 1}


def child(case: str, where: str, repeat: int, threads: int, double: int, single: int) -> dict:
    """One case, in this process: per module (`where` a key of SHAPES) or over the model's modules ("model")."""
    torch.set_num_threads(1)  # as lowrank.py runs anyway: the parallelism is --threads modules at once
    if case == "streamed rank 64":
        return streamed(threads)
    if where in SHAPES:
        call = operation(case, SHAPES[where], 0)
        call()  # once untimed: the first call of a process also loads MKL's kernels
        seconds = statistics.median(timed(call) for _ in range(repeat))
        return {"compute": seconds, "modules": 1}
    modules = lora_modules({**FLUX, "num_layers": double, "num_single_layers": single, "guidance_embeds": True})
    if case == "nothing":
        return {"compute": 0.0, "modules": len(modules)}

    def one(index: int) -> float:
        return timed(operation(case, modules[index][1], 2 * index))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        compute = sum(pool.map(one, range(len(modules))))
    return {"compute": compute, "wall": time.perf_counter() - start, "modules": len(modules)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=19, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=38, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per module case (the median is shown)")
    ap.add_argument("--threads", type=int, default=1, help="modules computed at once over the model")
    ap.add_argument("--cap", type=int, default=4096, help="memory cap (MiB, page cache included) of each case")
    ap.add_argument("--streamed", action="store_true", help="also factor a 55296 x 6144 matrix from streamed rows (minutes)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "WHERE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.repeat, args.threads, args.double, args.single)))
        return
    print(f"lowrank_bench: FLUX.1 width, {args.double} double + {args.single} single blocks, --threads {args.threads}, torch {torch.__version__}")
    print("| case | where | modules | compute s | wall s | peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    cases = [("nothing", "model")] + [(case, where) for where in [*SHAPES, "model"] for case in ("merge exact", "merge rank 64", "resize 128->32")]
    cases += [("streamed rank 64", " x ".join(map(str, LARGEST)))] if args.streamed else []
    for case, where in cases:
        cmd = [sys.executable, __file__, "--child", case, where, *(f"--{k}={getattr(args, k)}" for k in ("repeat", "threads", "double", "single"))]
        _, peak, code, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO)})
        if code:
            sys.exit(f"{case} on {where} failed (exit {code}):\n{tail}")
        result = json.loads(next(line for line in tail.splitlines() if line.startswith("{")))
        whole = f"{result['wall']:.1f}" if "wall" in result else "-"
        print(f"| {case} | {where} | {result['modules']} | {result['compute']:.3f} | {whole} | {peak or '-'} |", flush=True)

if __name__ == "__main__":
    main()
