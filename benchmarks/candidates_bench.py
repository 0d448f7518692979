"""Benchmark: the memory of a previewed job whose merge is never written (keep_weights=false) against one that
writes its merge, and of a sweep of such jobs, each run under a memory cap that counts the page cache.

    python benchmarks/candidates_bench.py --double 2 --single 4 --jobs 3 --cap 12288   # FLUX width, 2.6 GB merge

Sources: two FLUX.1-shaped diffusers folders (merge_bench.generate: schnell-like and Krea-like, sparse zeros,
so they take no disk). The preview pipeline is built offline at FLUX.1's width where it meets the transformer
(CLIP 768 wide, T5 4096 wide, a VAE of 16 latent channels: tests/sweep_helpers.build_pipeline), with tiny
encoders otherwise: the figures are the transformer's and fluxrecipe's own, not those of FLUX.1-schnell's text
encoders (T5-XXL is 9.5 GB in bf16; fluxrecipe loads them before the merge and lets them go after encoding).
Scenarios, each `python -m fluxrecipe` with preview=true (1 prompt, 1 seed, 1 step, 128x128) in a fresh cgroup:
  written    a single run that writes its merge (keep_weights=true) and renders from the written folder
  memory     the same run with keep_weights=false: merged into memory, rendered from there, nothing written
  sweep      -m recipe.alpha=... over --jobs values, keep_weights=false, basic launcher (one process)
Prints one Markdown table: the merge's size, wall seconds and peak memory (MiB) of each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from merge_bench import FLUX, REPO, generate, run_measured

sys.path.insert(0, str(REPO / "tests"))

from sweep_helpers import build_pipeline

RECIPE = """\
sources: {{schnell: {schnell}, krea: {krea}}}
base: schnell
alpha: 0.5
rules:
  - match: '.*'
    op: lerp:${{recipe.alpha}}
dtype: bf16
"""
PREVIEW = ["preview=true", "preview.prompts=[a photo of the cat]", "preview.seeds=[0]", "preview.steps=1", "preview.height=128", "preview.width=128", "progress=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--jobs", type=int, default=3, help="jobs of the in-memory sweep")
    ap.add_argument("--cap", type=int, default=12288, help="memory cap (MiB, page cache included)")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary folder under /tmp)")
    args = ap.parse_args()
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="fluxrecipe-candidates-", dir="/tmp"))
    try:
        schnell, krea = scratch / "schnell", scratch / "krea"
        generate(schnell, double=args.double, single=args.single, guidance=False, seed=1, sparse=True)
        generate(krea, double=args.double, single=args.single, guidance=True, seed=2, sparse=True)
        widths = {"joint_attention_dim": FLUX["joint_attention_dim"], "pooled_projection_dim": FLUX["pooled_projection_dim"], "in_channels": FLUX["in_channels"]}
        tiny = dict(patch_size=1, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=[4, 4, 8], **widths)
        pipeline = build_pipeline(scratch / "pipeline", tiny)
        (scratch / "recipes").mkdir()
        (scratch / "recipes" / "pair.yaml").write_text(RECIPE.format(schnell=schnell, krea=krea))
        env = {"FLUXRECIPE_RECIPE_PATH": str(scratch / "recipes"), "HF_HUB_OFFLINE": "1"}
        merged = sum(f.stat().st_size for f in schnell.glob("*.safetensors"))
        common = ["recipe=pair", f"preview.pipeline={pipeline}", *PREVIEW]
        alphas = ",".join(str(round((i + 1) / (args.jobs + 1), 3)) for i in range(args.jobs))
        scenarios = {
            "written": [*common, f"hydra.run.dir={scratch / 'written'}"],
            "memory": [*common, "keep_weights=false", f"hydra.run.dir={scratch / 'memory'}"],
            f"sweep of {args.jobs}": ["-m", *common, f"recipe.alpha={alphas}", "keep_weights=false", f"hydra.sweep.dir={scratch / 'sweep'}"],
        }
        rows = []
        for name, overrides in scenarios.items():
            wall, peak, code, tail = run_measured([sys.executable, "-m", "fluxrecipe", *overrides], args.cap, env=env)
            if code != 0:
                sys.exit(f"{name} failed ({code}):\n{tail}")
            written = sum(p.stat().st_size for p in scratch.rglob("*.safetensors") if p.parent.name not in ("schnell", "krea") and "pipeline" not in p.parts)
            rows.append(f"| {name} | {wall:.1f} | {peak} | {written / 2**20:.0f} |")
            for folder in ("written", "memory", "sweep"):
                shutil.rmtree(scratch / folder, ignore_errors=True)
        print(f"FLUX.1 width, {args.double} double + {args.single} single blocks: the merge is {merged / 2**20:.0f} MiB (bf16); cap {args.cap} MiB\n")
        print("| scenario | wall s | peak MiB | weights written MiB |\n|---|---|---|---|")
        print("\n".join(rows))
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
