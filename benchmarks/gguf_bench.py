"""Benchmark: GGUF outputs against the I/O floor, in one run (issue 17).

    python benchmarks/gguf_bench.py --double 1 --single 3                # FLUX width, 1.64 GB per source
    python benchmarks/gguf_bench.py --full --sparse --cap 1024           # 19/38 blocks, 23.8 GB per source

Generates FLUX-shaped sources as merge_bench.py does (schnell and Krea as diffusers folders in the hub's
shard layout), then runs each scenario in a fresh memory cgroup (page cache included) right after measuring
that scenario's own floor (read the bytes it reads, write as many bytes as it writes, fsync):
  to_gguf Q8_0          recipe=to_gguf on the Krea folder: one Q8_0 file
  lerp -> Q4_0          recipe=krea_schnell format=gguf gguf_type=Q4_0: two folders lerped into one Q4_0 file
Every quantized block is computed by the gguf package's numpy quantizers, so unlike a bf16 merge these runs
are bound by the CPU, not the disk: the table says by how much.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formats_bench import measure_scenarios
from merge_bench import REPO, arguments, generate, parsed

sys.path.insert(0, str(REPO))
from fluxrecipe.plan import human_bytes


def main() -> None:
    args, scratch = parsed(arguments(__doc__))
    schnell, krea = scratch / "schnell", scratch / "krea"
    try:
        for folder, guidance, seed in ((schnell, False, 0), (krea, True, 1)):
            if not (folder / "config.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, double=args.double, single=args.single, guidance=guidance, seed=seed, sparse=args.sparse)
        shards = {name: sorted(folder.glob("*.safetensors")) for name, folder in (("schnell", schnell), ("krea", krea))}
        print(f"sources: FLUX width, {args.double} double + {args.single} single blocks, {human_bytes(sum(p.stat().st_size for p in shards['krea']))} per source in bf16"
              f"{' (sparse)' if args.sparse else ''}", flush=True)
        scenarios = [
            ("to_gguf Q8_0", [shards["krea"]], ["recipe=to_gguf", f"recipe.sources.model={krea}", "gguf_type=Q8_0"]),
            ("lerp -> Q4_0", [shards["schnell"], shards["krea"]], ["recipe=krea_schnell", f"recipe.sources.schnell={schnell}", f"recipe.sources.krea={krea}", "format=gguf", "gguf_type=Q4_0"]),
        ]
        measure_scenarios([(name, sources, scratch / "out.gguf", overrides) for name, sources, overrides in scenarios], args, scratch)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
