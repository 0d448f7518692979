"""Benchmark: merges of the model families beside FLUX.1 against the I/O floor, each in a memory cgroup, in one run.

    python benchmarks/families_bench.py --variant dev --double 1 --single 2        # FLUX.2-dev width (6144): lerp + rank-64 extraction
    python benchmarks/families_bench.py --variant klein9b --full --sparse --no-extract   # full-size klein 9B lerp (sparse sources)
    python benchmarks/families_bench.py --variant chroma --full --sparse --no-extract    # full-size Chroma1 lerp (sparse sources)
    python benchmarks/families_bench.py --variant flux3 --full --sparse --no-extract     # full-size FLUX.3 (distilled) lerp
    python benchmarks/families_bench.py --variant tiny --double 1 --single 2       # a smoke run of the script (seconds)

Generates two sources of --variant (FLUX.2 dev, klein 9B, klein 4B; Chroma1; FLUX.3 distilled) at its width
(diffusers layout, hub-like shards: merge_bench.generate; --full: the variant's own block counts; FLUX.3's
--double is its per-mode blocks), then, each from a cold page cache (--cache cold, needs root; else
warm):
  floor     read both sources, write as many bytes as the output (merge_bench.floor_seconds)
  lerp      python -m fluxrecipe: lerp:0.5 of the two, bf16
  extract   the second source's difference to the first as a kohya LoRA of rank --rank (format=lora): FLUX.2
            dev's largest matrix is a single block's fused to_qkv_mlp_proj, 55296 x 6144 (1.36 GB in float32)
fluxrecipe runs in a fresh memory cgroup capped at --cap MiB, page cache included (../shared/tools/memcap).
`--sparse` writes the sources as sparse files (zeros: no disk space, read at memory speed): for the full
sizes, where the point is memory. Prints one Markdown table.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import REPO, arguments, floor_seconds, generate, parsed, prepare_cache, run_measured

from fluxrecipe.plan import human_bytes

FLUX2 = {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "attention_head_dim": 128, "timestep_guidance_channels": 256, "axes_dims_rope": [32, 32, 32, 32]}
VARIANTS = {  # name -> (config besides the blocks, guidance embedder, the variant's own double and single blocks)
    "dev": ({**FLUX2, "num_attention_heads": 48, "joint_attention_dim": 15360}, True, (8, 48)),
    "klein9b": ({**FLUX2, "num_attention_heads": 32, "joint_attention_dim": 12288}, False, (8, 24)),
    "klein4b": ({**FLUX2, "num_attention_heads": 24, "joint_attention_dim": 7680}, False, (5, 20)),
    "tiny": ({**FLUX2, "in_channels": 16, "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 64, "timestep_guidance_channels": 32, "axes_dims_rope": [8, 8, 8, 8]}, True, (2, 4)),
    # Chroma1-HD's config and Flux3Transformer2DModel's default (a distilled one): configs without guidance_embeds
    "chroma": ({"_class_name": "ChromaTransformer2DModel", "patch_size": 1, "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                "axes_dims_rope": [16, 56, 56], "approximator_num_channels": 64, "approximator_hidden_dim": 5120, "approximator_layers": 5}, None, (19, 38)),
    "flux3": ({"_class_name": "Flux3Transformer2DModel", "in_channels": 128, "cond_in_channels": 128, "attention_head_dim": 128, "num_attention_heads": 24,
               "joint_attention_dim": 20480, "timestep_channels": 256, "axes_dims_rope": [32, 32, 32, 32], "flow_map": True}, None, (5, 28)),
}
RECIPES = {
    "lerp": "description: families_bench lerp\nsources: {{a: {a}, b: {b}}}\nrules:\n  - match: '.*'\n    op: lerp:0.5\ndtype: bf16\n",
    "extract": "description: families_bench extract\nsources: {{tuned: {b}, base: {a}}}\nbase: base\nrules:\n  - match: '.*'\n    op: take:tuned\ndtype: bf16\n",
}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--variant", choices=list(VARIANTS), default="dev", help="the family and width (and, with --full, blocks)")
    ap.add_argument("--rank", type=int, default=64, help="the extraction's LoRA rank")
    ap.add_argument("--no-extract", action="store_true", help="the lerp only")
    args, scratch = parsed(ap)
    base, guidance, blocks = VARIANTS[args.variant]
    if args.full:
        args.double, args.single = blocks
    a, b, recipes = scratch / "a", scratch / "b", scratch / "recipes"
    try:
        for folder, seed in ((a, 0), (b, 1)):
            if not (folder / "config.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, double=args.double, single=args.single, guidance=guidance, seed=seed, sparse=args.sparse, base=base)
        recipes.mkdir(exist_ok=True)
        for name, text in RECIPES.items():
            (recipes / f"{name}.yaml").write_text(text.format(a=a, b=b))
        sources = [sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))]
        size = json.loads((a / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
        width = base["num_attention_heads"] * base["attention_head_dim"]
        print(f"sources: {base['_class_name']} {args.variant} width {width}, {args.double} double + {args.single} single blocks, {size / 2e9:.2f} B parameters, "
              f"{human_bytes(size)} per source in bf16{' (sparse)' if args.sparse else ''}; cache {args.cache}", flush=True)
        read_seq, read_par, write_s = floor_seconds(sources, size, scratch, args.cache)
        print(f"I/O floor: read both sources {read_par:.1f} s concurrently ({read_seq:.1f} s one after the other); write {human_bytes(size)} {write_s:.1f} s (fsync)")
        runs = [("lerp", "lerp:0.5, bf16", [], read_par + write_s)]  # (recipe, what, options, its floor: the reads and what it writes)
        if not args.no_extract:
            runs.append(("extract", f"format=lora lora_rank={args.rank}", ["format=lora", f"lora_rank={args.rank}"], read_par))
        rows = []
        for name, what, options, floor in runs:
            out = scratch / (f"{name}.safetensors" if options else name)
            prepare_cache(args.cache, sources[0] + sources[1])
            cmd = [sys.executable, "-m", "fluxrecipe", f"recipe={name}", f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *options, *args.fluxrecipe_args]
            wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO), "FLUXRECIPE_RECIPE_PATH": str(recipes)})
            written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else (out.stat().st_size if out.exists() else 0)
            if out.is_dir():
                shutil.rmtree(out)
            else:
                out.unlink(missing_ok=True)
            phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
            rows.append((f"fluxrecipe {what}, cap {args.cap} MiB", floor, wall, float(phase[1]) if phase else None, peak, rc, human_bytes(written)))
            if rc:
                print(f"fluxrecipe {name} failed (exit {rc}{', killed for memory' if rc == 137 else ''}):\n{tail}", file=sys.stderr)
        print()
        print("wall: the whole command (start-up included); merge: the merge itself, as fluxrecipe logs it; floor: the reads (concurrent) + what the run writes")
        print("| run | floor s | wall s | wall / floor | merge s | merge / floor | peak MiB | written | exit |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, floor, wall, phase, peak, code, written in rows:
            merge = f"{phase:.1f} | {phase / floor:.2f}" if phase is not None else "- | -"
            print(f"| {name} | {floor:.1f} | {wall:.1f} | {wall / floor:.2f} | {merge} | {peak or '-'} | {written} | {'ok' if code == 0 else f'failed ({code})'} |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
