"""Benchmark: where one chunk's CPU goes, piece by piece, as the executor runs it (one thread, glibc keeping
freed buffers), for a two-source lerp of one chunk (1M elements, bf16 in) written as bf16 and as fp8.

    python benchmarks/chunk_bench.py

Each piece is timed in thread CPU time, best of --repeat runs: on a shared machine that is the number that
other work disturbs least (wall time counts the waits for a core).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxrecipe.diagnostics import Distances
from fluxrecipe.execute.kernel import to_float32
from fluxrecipe.execute.observers import DistanceObserver
from fluxrecipe.families import FAMILIES
from fluxrecipe.linux import keep_freed_memory
from fluxrecipe.ops import OPS


def best_ms(work, repeat: int) -> float:
    work()
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 20, help="elements per chunk (the default chunk_elements)")
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the executor does
    n = args.elements
    raws = [(torch.randn(n, generator=torch.Generator().manual_seed(i)) * 0.05).bfloat16() for i in (1, 2)]
    xs = [to_float32(r) for r in raws]
    merged = OPS["lerp"].call(xs, {"alpha": 0.5})
    observer = DistanceObserver(Distances(FAMILIES[-1]))
    step, chunk = SimpleNamespace(numel=n), SimpleNamespace(start=0, scale=None)
    rows = [("decode the 2 inputs", lambda: [to_float32(r) for r in raws]), ("lerp", lambda: OPS["lerp"].call(xs, {"alpha": 0.5}))]
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        written = merged.to(dtype)
        out = SimpleNamespace(written=written, inputs=xs)
        rows.append((f"{name}: NaN/Inf check and rounding", lambda dtype=dtype: (torch.aminmax(merged), merged.to(dtype))))
        rows.append((f"{name}: diagnostics (2 sources)", lambda out=out: observer.observe(step, chunk, out)))
    print(f"one chunk of {n} elements, best of {args.repeat}, thread CPU time:")
    for name, work in rows:
        print(f"  {name:40s} {best_ms(work, args.repeat):6.2f} ms")


if __name__ == "__main__":
    main()
