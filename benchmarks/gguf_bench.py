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

import math
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import REPO, arguments, floor_seconds, generate, parsed, prepare_cache, run_measured

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
        rows = []
        out = scratch / "out.gguf"
        for name, sources, overrides in scenarios:
            dry = run_measured([sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "dry_run=true", f"hydra.run.dir={scratch / 'hydra'}"], None, env={"PYTHONPATH": str(REPO)})
            written = re.search(r"total: .* write ([\d.]+) (KB|MB|GB|TB)", dry[3])
            out_bytes = int(float(written[1]) * {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[written[2]])
            read_seq, read_par, write_s = floor_seconds(sources, out_bytes, scratch, args.cache)
            prepare_cache(args.cache, [p for files in sources for p in files])
            cmd = [sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
            wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO)})
            out.unlink(missing_ok=True)
            if rc:
                print(f"{name}: fluxrecipe failed (exit {rc}):\n{tail}", file=sys.stderr)
            phase = re.search(r"in ([\d.]+) s \(", tail)
            rows.append((name, read_seq + write_s, read_par + write_s, wall, float(phase[1]) if phase else math.nan, peak, rc, human_bytes(out_bytes)))
            print(f"  {name}: floor {read_seq + write_s:.1f} s (sequential) / {read_par + write_s:.1f} s (concurrent), wall {wall:.1f} s, peak {peak} MiB, exit {rc}", flush=True)
        print()
        print("| scenario | written | floor s (sequential / concurrent) | wall s | wall / floor (seq, conc) | merge s | peak MiB | exit |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for name, floor_seq, floor_par, wall, phase, peak, rc, written in rows:
            print(f"| {name} | {written} | {floor_seq:.1f} / {floor_par:.1f} | {wall:.1f} | {wall / floor_seq:.2f}, {wall / floor_par:.2f} | {phase:.1f} | {peak} | {'ok' if rc == 0 else rc} |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
