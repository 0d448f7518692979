"""Benchmark: merges and conversions across layouts against the I/O floor, in one run (issue 8).

    python benchmarks/formats_bench.py --double 1 --single 3             # FLUX width, 1.64 GB per source
    python benchmarks/formats_bench.py --full --sparse --cap 1024         # 19/38 blocks, 23.8 GB per source

Generates FLUX-shaped sources as merge_bench.py does (schnell and Krea as diffusers folders in the hub's
shard layout), plus Krea as one Black Forest Labs file, then runs each scenario in a fresh memory cgroup
(page cache included) from a cold page cache, right after measuring that scenario's own floor (read the
bytes it reads, write as many bytes as it writes, fsync):
  diffusers lerp          recipe=krea_schnell: two diffusers folders -> diffusers (the v1 merge)
  BFL -> diffusers        recipe=to_diffusers on the BFL file
  diffusers -> ComfyUI fp8  recipe=to_comfyui_fp8 on the Krea folder
  BFL + diffusers -> BFL  recipe=krea_schnell_guided with Krea as the BFL file, format=bfl
The table gives each run's wall time over its floor: a scenario does as well as the v1 merge when its ratio is
no worse than the first row's.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import REPO, arguments, floor_seconds, generate, generate_bfl, parsed, prepare_cache, run_measured

sys.path.insert(0, str(REPO))
from fluxrecipe.plan import human_bytes


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--only", nargs="*", default=None, help="run only the scenarios whose name contains one of these")
    args, scratch = parsed(ap)
    schnell, krea, krea_bfl = scratch / "schnell", scratch / "krea", scratch / "krea-bfl.safetensors"
    try:
        for folder, guidance, seed in ((schnell, False, 0), (krea, True, 1)):
            if not (folder / "config.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, double=args.double, single=args.single, guidance=guidance, seed=seed, sparse=args.sparse)
        if not krea_bfl.exists():
            generate_bfl(krea_bfl, double=args.double, single=args.single, guidance=True, seed=1, sparse=args.sparse)
        shards = {name: sorted(folder.glob("*.safetensors")) for name, folder in (("schnell", schnell), ("krea", krea))}
        model_bytes = sum(p.stat().st_size for p in shards["schnell"])
        print(f"sources: FLUX width, {args.double} double + {args.single} single blocks, {human_bytes(model_bytes)} per source in bf16"
              f"{' (sparse)' if args.sparse else ''}", flush=True)

        scenarios = [
            ("diffusers lerp (v1's merge)", [shards["schnell"], shards["krea"]], "transformer",
             ["recipe=krea_schnell", f"recipe.sources.schnell={schnell}", f"recipe.sources.krea={krea}"]),
            ("BFL -> diffusers", [[krea_bfl]], "transformer",
             ["recipe=to_diffusers", f"recipe.sources.model={krea_bfl}"]),
            ("diffusers -> ComfyUI fp8", [shards["krea"]], "krea-fp8.safetensors",
             ["recipe=to_comfyui_fp8", f"recipe.sources.model={krea}"]),
            ("BFL + diffusers lerp -> BFL", [shards["schnell"], [krea_bfl]], "merged-bfl.safetensors",
             ["recipe=krea_schnell_guided", f"recipe.sources.schnell={schnell}", f"recipe.sources.krea={krea_bfl}", "format=bfl"]),
        ]
        chosen = [(name, sources, scratch / out_name, overrides) for name, sources, out_name, overrides in scenarios if not args.only or any(o in name for o in args.only)]
        measure_scenarios(chosen, args, scratch)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def measure_scenarios(scenarios: list[tuple[str, list[list[Path]], Path, list[str]]], args, scratch: Path) -> None:
    """Each scenario (name, the source files it reads, its output, fluxrecipe's overrides): its own I/O floor
    (the bytes it reads, as many written as its dry run says it writes), then fluxrecipe in a memory cgroup
    of args.cap MiB; its output deleted after; one Markdown table at the end."""
    rows = []
    for name, sources, out, overrides in scenarios:
        dry = run_measured([sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "dry_run=true", f"hydra.run.dir={scratch / 'hydra'}"], None, env={"PYTHONPATH": str(REPO)})
        written = re.search(r"total: .* write ([\d.]+) (KB|MB|GB|TB)", dry[3])
        out_bytes = int(float(written[1]) * {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[written[2]])
        read_seq, read_par, write_s = floor_seconds(sources, out_bytes, scratch, args.cache)
        prepare_cache(args.cache, [p for files in sources for p in files])
        cmd = [sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
        wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO)})
        phase = re.search(r"in ([\d.]+) s \(", tail)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
        if rc:
            print(f"{name}: fluxrecipe failed (exit {rc}):\n{tail}", file=sys.stderr)
        rows.append((name, read_seq + write_s, read_par + write_s, wall, float(phase[1]) if phase else math.nan, peak, rc, human_bytes(out_bytes)))
        print(f"  {name}: floor {read_seq + write_s:.1f} s (sequential) / {read_par + write_s:.1f} s (concurrent), wall {wall:.1f} s, peak {peak} MiB, exit {rc}", flush=True)
    print()
    print("| scenario | written | floor s (sequential / concurrent) | wall s | wall / floor (seq, conc) | merge s | peak MiB | exit |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, floor_seq, floor_par, wall, phase, peak, rc, written in rows:
        print(f"| {name} | {written} | {floor_seq:.1f} / {floor_par:.1f} | {wall:.1f} | {wall / floor_seq:.2f}, {wall / floor_par:.2f} | {phase:.1f} | {peak} | {'ok' if rc == 0 else rc} |")


if __name__ == "__main__":
    main()
