"""Benchmark: LoRAs baked into a merge, against the I/O floor and the same merge without them, in a memory cgroup.

    python benchmarks/lora_bench.py --full --sparse --cap 1024      # FLUX.1's size, two rank-64 LoRAs
    python benchmarks/lora_bench.py --double 1 --single 3           # FLUX width, 0.82 B parameters, real data
    python benchmarks/lora_bench.py --double 1 --single 3 --extract # a merge written as a LoRA (format=lora)
    python benchmarks/lora_bench.py --full --toolkit --cap 1024     # LoRAs alone: merged, cut, resized

Generates one source the way the hub lays out FLUX.1 (merge_bench.generate) and two kohya LoRAs of rank
--rank on every Linear module of it (BFL's module names, fused q/k/v and linear1 included; random bf16, always
real data: a rank-64 FLUX.1 LoRA is about 0.6 GB), then, each from a cold page cache:
  floor     read the source and both LoRAs, write as many bytes as the output (merge_bench.floor_seconds)
  plain     python -m fluxrecipe: the source taken as it is, bf16 to bf16 (byte copies: the merge's own floor)
  loras     the same with both LoRAs baked in (strength 0.8 and 0.5)
fluxrecipe runs in a fresh memory cgroup capped at --cap MiB, page cache included (../shared/tools/memcap).
With --extract it instead generates a second source (other random weights) and writes what it learned over the
first as a kohya LoRA of rank --rank (format=lora): every matrix's whole difference is held and factored,
so its memory is bounded by the largest matrix (BFL's linear1: 21504 x 3072 in float32, 264 MB).
With --toolkit no model is generated: two rank-64 kohya LoRAs and one of rank 128 (FLUX width, --double and
--single blocks) are combined with no model, as recipes of LoRAs alone (lora_space.py): the two merged exactly
(format=lora, rank 128), the two cut to lora_rank=64 (their sum's best rank-64 approximation), and the rank-128
one resized to lora_rank=32 (recipe=convert_lora); warm cache (the LoRAs were just written).
`--sparse` writes the source as a sparse file (zeros: no disk space, read at memory speed); the LoRAs and the
output are real. Prints one Markdown table.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import FLUX, REPO, arguments, floor_seconds, generate, parsed, prepare_cache, run_measured

from fluxrecipe import families
from fluxrecipe.architecture import expected_parameters
from fluxrecipe.formats import bfl
from fluxrecipe.formats.lora import module_names
from fluxrecipe.plan import human_bytes
from fluxrecipe.writer import open_safetensors


def lora_modules(config: dict) -> list[tuple[str, tuple[int, int]]]:
    """(module, (rows, cols)) of every Linear module of the model `config` describes, in BFL's module names
    (fused q/k/v and linear1 included): what a kohya FLUX LoRA covers."""
    shapes = expected_parameters(config, "benchmark config")
    return [(t.name[: -len(".weight")], t.shape) for t in bfl.out_tensors(shapes, dict.fromkeys(shapes, "BF16"), "", families.recognise(shapes).bfl) if t.name.endswith(".weight") and len(t.shape) == 2]


def make_lora(path: Path, config: dict, rank: int, seed: int) -> None:
    """A kohya LoRA of `rank` on every Linear module of the model `config` describes, in BFL's module names."""
    entries = []
    for module, (rows, cols) in lora_modules(config):
        down, up, alpha = module_names("kohya", module)
        r = min(rank, rows, cols)  # as a trainer caps it (img_in reads 64 channels)
        entries += [(down, "BF16", (r, cols)), (up, "BF16", (rows, r)), (alpha, "F32", ())]
    gen = torch.Generator().manual_seed(seed)
    f = open_safetensors(path, entries, {"format": "pt"})
    for _, dtype, shape in entries:
        data = torch.tensor([rank / 2], dtype=torch.float32) if dtype == "F32" else (torch.randn(math.prod(shape), generator=gen) * 0.01).to(torch.bfloat16)
        f.write(data.view(torch.uint8).numpy())
    f.close()


EXTRACT = """\
description: lora_bench extract
sources:
  tuned: {tuned}
  base: {source}
base: base
rules:
  - match: '.*'
    op: take:tuned
dtype: bf16
"""
RECIPE = """\
description: lora_bench {what}
sources:
  model: {source}
rules:
  - match: '.*'
    op: take:model
dtype: bf16
"""


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--extract", action="store_true", help="write a second source's difference to the first as a LoRA, instead of baking LoRAs in")
    ap.add_argument("--toolkit", action="store_true", help="merge, cut and resize LoRAs with no model (recipes of LoRAs alone), instead of baking them in")
    args, scratch = parsed(ap)
    if args.toolkit:
        try:
            toolkit(args, scratch)
        finally:
            if not args.keep and args.dir is None:
                shutil.rmtree(scratch, ignore_errors=True)
        return
    source, recipes = scratch / "model", scratch / "recipes"
    loras = [scratch / "style.safetensors", scratch / "detail.safetensors"]
    try:
        if not (source / "config.json").exists():
            shutil.rmtree(source, ignore_errors=True)
            generate(source, double=args.double, single=args.single, guidance=True, seed=0, sparse=args.sparse)
        config = json.loads((source / "config.json").read_text())
        if args.extract:
            tuned = scratch / "tuned"
            if not (tuned / "config.json").exists():
                shutil.rmtree(tuned, ignore_errors=True)
                generate(tuned, double=args.double, single=args.single, guidance=True, seed=1, sparse=args.sparse)
            extract(args, scratch, source, tuned)
            return
        for i, path in enumerate(loras):
            if not path.exists():
                make_lora(path, config, args.rank, seed=i + 1)
        files = sorted(source.glob("*.safetensors"))
        out_bytes = json.loads((source / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
        lora_bytes = sum(p.stat().st_size for p in loras)
        print(f"source: FLUX width, {args.double} double + {args.single} single blocks, {human_bytes(out_bytes)} in bf16{' (sparse)' if args.sparse else ''}; "
              f"two rank-{args.rank} kohya LoRAs on every Linear module, {human_bytes(lora_bytes)}; cache {args.cache}", flush=True)
        recipes.mkdir(exist_ok=True)
        (recipes / "plain.yaml").write_text(RECIPE.format(what="plain", source=source))
        (recipes / "loras.yaml").write_text(
            RECIPE.format(what="loras", source=source)
            + f"loras:\n  style: {{path: {loras[0]}, strength: 0.8}}\n  detail: {{path: {loras[1]}, strength: 0.5}}\n"
        )

        read_seq, read_par, write_s = floor_seconds([files, loras[:1], loras[1:]], out_bytes, scratch, args.cache)
        rows = [(f"I/O floor: read {human_bytes(out_bytes + lora_bytes)} ({read_par:.1f} s, concurrently; {read_seq:.1f} s one after the other) + write {human_bytes(out_bytes)} ({write_s:.1f} s)", read_par + write_s, None, None, 0)]
        for name in ("plain", "loras"):
            out = scratch / f"out-{name}"
            prepare_cache(args.cache, files + loras)
            cmd = [sys.executable, "-m", "fluxrecipe", f"recipe={name}", f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
            wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO), "FLUXRECIPE_RECIPE_PATH": str(recipes)})
            shutil.rmtree(out, ignore_errors=True)
            phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
            rows.append((f"fluxrecipe, {'no LoRA' if name == 'plain' else 'two LoRAs baked in'}, cap {args.cap} MiB", wall, float(phase[1]) if phase else None, peak, rc))
            if rc:
                print(f"fluxrecipe failed (exit {rc}{', killed for memory' if rc == 137 else ''}):\n{tail}", file=sys.stderr)
        floor = rows[0][1]
        print()
        print("wall: the whole command (start-up included); merge: the merge itself, as fluxrecipe logs it; floor: concurrent reads + write")
        print("| run | wall s | wall / floor | merge s | merge / floor | peak MiB | exit |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, wall, phase, peak, code in rows:
            merge = f"{phase:.1f} | {phase / floor:.2f}" if phase is not None else "- | -"
            print(f"| {name} | {wall:.1f} | {wall / floor:.2f} | {merge} | {peak or '-'} | {'ok' if code == 0 else f'failed ({code})'} |")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


def extract(args, scratch: Path, source: Path, tuned: Path) -> None:
    """format=lora of `tuned` over `source`: the floor (both sources read, the LoRA written) and the run."""
    recipes = scratch / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "extract.yaml").write_text(EXTRACT.format(tuned=tuned, source=source))
    sources = [sorted(source.glob("*.safetensors")), sorted(tuned.glob("*.safetensors"))]
    size = json.loads((source / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"two sources: FLUX width, {args.double} double + {args.single} single blocks, {human_bytes(size)} each in bf16{' (sparse)' if args.sparse else ''}; "
          f"the difference as a rank-{args.rank} kohya LoRA; cache {args.cache}", flush=True)
    read_seq, read_par, _ = floor_seconds(sources, 1, scratch, args.cache)
    out = scratch / "extracted.safetensors"
    prepare_cache(args.cache, sources[0] + sources[1])
    cmd = [sys.executable, "-m", "fluxrecipe", "recipe=extract", "format=lora", f"lora_rank={args.rank}", f"output={out}", "progress=false",
           f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
    wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO), "FLUXRECIPE_RECIPE_PATH": str(recipes)})
    written = out.stat().st_size if out.exists() else 0
    out.unlink(missing_ok=True)
    phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
    errors = [float(m) for m in re.findall(r"rank +\d+ +([\d.e+-]+)$", tail, re.M)]
    if rc:
        print(f"fluxrecipe failed (exit {rc}{', killed for memory' if rc == 137 else ''}):\n{tail}", file=sys.stderr)
    print()
    print("| run | wall s | merge s | peak MiB | exit |")
    print("|---|---:|---:|---:|---|")
    print(f"| I/O floor: read both sources ({read_par:.1f} s concurrently, {read_seq:.1f} s one after the other) | {read_par:.1f} | | | |")
    print(f"| fluxrecipe format=lora lora_rank={args.rank} ({human_bytes(written)} written), cap {args.cap} MiB | {wall:.1f} | {phase[1] if phase else '-'} | {peak or '-'} | {'ok' if rc == 0 else f'failed ({rc})'} |")
    if errors:
        what = "zeros: no difference" if args.sparse else "random weights: a difference of full rank"
        print(f"relative errors of the {len(errors)} matrices logged last: median {sorted(errors)[len(errors) // 2]:.3e}, largest {max(errors):.3e} ({what})")


def toolkit(args, scratch: Path) -> None:
    """Recipes of LoRAs alone: the two rank-64 LoRAs merged exactly and cut to rank 64, a rank-128 one resized to 32."""
    config = {**FLUX, "num_layers": args.double, "num_single_layers": args.single, "guidance_embeds": True}
    style, detail, wide = scratch / "style.safetensors", scratch / "detail.safetensors", scratch / "wide.safetensors"
    for i, (path, rank) in enumerate(((style, 64), (detail, 64), (wide, 128))):
        if not path.exists():
            make_lora(path, config, rank, seed=i + 1)
    print(f"LoRAs: FLUX width, {args.double} double + {args.single} single blocks, every Linear module (kohya, bf16): two of rank 64 "
          f"({human_bytes(style.stat().st_size)} each), one of rank 128 ({human_bytes(wide.stat().st_size)}); warm cache", flush=True)
    runs = [
        ("merge two rank-64 LoRAs, exact (rank 128)", ["recipe=merge_loras", f"recipe.loras.first.path={style}", f"recipe.loras.second.path={detail}", "recipe.loras.second.strength=0.5"]),
        ("merge two rank-64 LoRAs, lora_rank=64", ["recipe=merge_loras", f"recipe.loras.first.path={style}", f"recipe.loras.second.path={detail}", "recipe.loras.second.strength=0.5", "lora_rank=64"]),
        ("resize a rank-128 LoRA to lora_rank=32", ["recipe=convert_lora", f"recipe.loras.lora.path={wide}", "lora_rank=32"]),
    ]
    print()
    print("| run | wall s | merge s | written | peak MiB | exit |")
    print("|---|---:|---:|---:|---:|---|")
    for name, overrides in runs:
        out = scratch / "out.safetensors"
        cmd = [sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
        wall, peak, rc, tail = run_measured(cmd, args.cap, env={"PYTHONPATH": str(REPO)})
        written = out.stat().st_size if out.exists() else 0
        out.unlink(missing_ok=True)
        phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
        if rc:
            print(f"fluxrecipe failed (exit {rc}{', killed for memory' if rc == 137 else ''}):\n{tail}", file=sys.stderr)
        print(f"| {name}, cap {args.cap} MiB | {wall:.1f} | {phase[1] if phase else '-'} | {human_bytes(written)} | {peak or '-'} | {'ok' if rc == 0 else f'failed ({rc})'} |", flush=True)


if __name__ == "__main__":
    main()
