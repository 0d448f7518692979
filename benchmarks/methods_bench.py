"""Benchmark: every merge method against the I/O floor, in one run, each inside a memory cap.

    python benchmarks/methods_bench.py --double 1 --single 3                      # FLUX width, 1.64 GB per source
    python benchmarks/methods_bench.py --full --sparse --methods ties dare         # FLUX.1's size, 23.8 GB per source

Generates three FLUX-shaped sources the way merge_bench.py does (its generate(): the hub's diffusers layout,
10 GB shards scaled down to the model; random bf16, or sparse zeros with --sparse), measures the I/O floor
with merge_bench's floor_seconds() (read every source byte once, one source after the other and all
concurrently, and write the output's bytes with fsync), for two sources (slerp, lerp) and for three (the
rest), then runs `python -m fluxrecipe` once per method on a recipe over the sources, each in a fresh memory
cgroup (../shared/tools/memcap, page cache included) with the page cache dropped before it (--cache cold,
needs root) or the inputs pre-read (--cache warm). Prints one Markdown table.

Methods that need statistics read their inputs more than once: slerp and model_stock twice (a pass of dot
products, then the values), ties three times (two histogram passes for the exact threshold, then the
values). The floor counts each source byte once, so their ratio to it shows what that costs.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import yaml

from merge_bench import REPO, arguments, floor_seconds, generate, parsed, prepare_cache, run_measured

from fluxrecipe.plan import human_bytes

# method -> (op as a recipe writes it, how many sources it merges)
METHODS = {
    "lerp": ("lerp:0.5", 2),
    "slerp": ({"slerp": {"t": 0.5}}, 2),
    "task_arithmetic": ({"task_arithmetic": {"weights": [0.5, 0.5]}}, 3),
    "ties": ({"ties": {"density": 0.2}}, 3),
    "dare": ({"dare": {"p": 0.8, "seed": 1}}, 3),
    "dare_ties": ({"dare_ties": {"p": 0.8, "seed": 1}}, 3),
    "model_stock": ({"model_stock": None}, 3),
    "train_difference": ({"train_difference": {"alpha": 1.0}}, 3),
}
NAMES = ("a", "b", "c")


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args, scratch = parsed(ap)
    folders = [scratch / name for name in NAMES]
    try:
        for seed, folder in enumerate(folders):
            if not (folder / "config.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, double=args.double, single=args.single, guidance=True, seed=seed, sparse=args.sparse)
        shards = [sorted(f.glob("*.safetensors")) for f in folders]
        out_bytes = json.loads((folders[0] / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"sources: 3 x FLUX width, {args.double} double + {args.single} single blocks, {out_bytes / 2e9:.2f} B parameters, "
              f"{human_bytes(out_bytes)} per source in bf16{' (sparse)' if args.sparse else ''}; cache {args.cache}; cap {args.cap} MiB", flush=True)

        counts = sorted({METHODS[m][1] for m in args.methods})
        floors = {n: floor_seconds(shards[:n], out_bytes, scratch, args.cache) for n in counts}
        recipes = scratch / "recipes"
        recipes.mkdir(exist_ok=True)
        rows = []
        for method in args.methods:
            op, count = METHODS[method]
            recipe = {"sources": {n: str(f) for n, f in zip(NAMES[:count], folders)}, "rules": [{"match": ".*", "op": op}], "dtype": "bf16"}
            (recipes / f"bench_{method}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            out = scratch / f"merged-{method}"
            prepare_cache(args.cache, [p for files in shards[:count] for p in files])
            cmd = [sys.executable, "-m", "fluxrecipe", f"recipe=bench_{method}", f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
            wall, peak, code, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO), "FLUXRECIPE_RECIPE_PATH": str(recipes)})
            shutil.rmtree(out, ignore_errors=True)
            phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
            rows.append((method, count, wall, float(phase[1]) if phase else None, peak, code))
            if code:
                print(f"{method} failed (exit {code}):\n{tail}", file=sys.stderr)
            print(f"  {method}: {wall:.1f} s, peak {peak} MiB, exit {code}", flush=True)

        print()
        for n in counts:
            seq, par, write = floors[n]
            print(f"floor, {n} sources: read {seq:.1f} s one after the other, {par:.1f} s concurrently; write {write:.1f} s (fsync)")
        print("wall: the whole command (start-up included); merge: the merge itself, as fluxrecipe logs it; floor: concurrent reads + write")
        print("| method | sources | wall s | merge s | merge / floor | wall / floor | peak MiB | exit |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for method, count, wall, phase, peak, code in rows:
            _, par, write = floors[count]
            floor = par + write
            merge = f"{phase:.1f} | {phase / floor:.2f}" if phase is not None else "- | -"
            status = {0: "ok", 137: "killed (memory)"}.get(code, f"failed ({code})")
            print(f"| {method} | {count} | {wall:.1f} | {merge} | {wall / floor:.2f} | {peak or '-'} | {status} |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
