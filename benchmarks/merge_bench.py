"""Benchmark: fluxrecipe against the I/O floor and a seed-style baseline, on FLUX-shaped sources, in one run.

    python benchmarks/merge_bench.py --double 1 --single 3          # FLUX width, 0.82 B parameters, 1.64 GB/source
    python benchmarks/merge_bench.py --full --sparse --cap 1024     # 19/38 blocks, 23.8 GB/source (sparse files)

Generates sources the way the hub lays out FLUX.1-schnell and FLUX.1-Krea-dev (diffusers keys, 10 GB shards
scaled down to the model, Krea with the 4 guidance keys more, so shard boundaries shift), a third one (for
TIES and DARE) and Krea as one Black Forest Labs file, then runs each scenario (--scenarios):
  lerp      recipe=krea_schnell: two diffusers folders -> diffusers
  fp8       recipe=to_comfyui_fp8 on the Krea folder: one ComfyUI fp8 file
  bfl       recipe=to_diffusers on the BFL file: a diffusers folder
  ties      TIES (density 0.2) over three folders; dare: DARE (p 0.5) over the same
Per scenario: its I/O floor (read every source byte the plan uses + write as many bytes as the output, 16
MiB blocks, fsync), the reads timed twice: `cat` of the sources one after the other (DESIGN.md's floor), and
one `cat` per source, concurrently, as the merge reads them (a tighter floor on disks that like parallel
reads); then `python -m fluxrecipe` under --cap and once under --free-cap (its natural peak: under a tight
cap the peak shows only that clean page cache fills the cap before the kernel reclaims it). The lerp is also
run by what the seed script does (whole shards paired by position, whole merged state dict, save_file).
Each runs in a fresh memory cgroup (../shared/tools/memcap: page cache included) where it can be made, with
the page cache dropped before each (--cache cold, needs root) or the inputs pre-read (--cache warm). Prints
one Markdown table (its "CPU" column: the command's user + system seconds, all threads, so that a wall above
CPU / cores shows time waited; its "reads" column: the bytes fluxrecipe read from the sources, in times their
size, as it logs them: 2.00x for TIES' statistics pass and output pass); --hash prints the sha256 of every file each scenario wrote (outputs byte for byte, to
compare two versions). `--sparse` writes sources as sparse files (zeros, no disk space, reads at memory
speed): use it for the full size, where the point is memory, not read speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fluxrecipe.architecture import expected_parameters  # noqa: E402
from fluxrecipe.plan import human_bytes  # noqa: E402
from fluxrecipe.writer import open_safetensors, write_json  # noqa: E402

# ../shared/tools/memcap beside the checkout (or beside the folder of worktrees a checkout may be in)
MEMCAP = next((p for p in (REPO.parent / "shared" / "tools" / "memcap", REPO.parent.parent / "shared" / "tools" / "memcap") if p.exists()), REPO.parent / "shared" / "tools" / "memcap")
FLUX = dict(
    _class_name="FluxTransformer2DModel",
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56],
)
HUB_SHARD = 10 * 10**9  # the hub's FLUX.1 shards: 10 GB
TIMEOUT = -1  # exit code of a run stopped at its time limit


def generate(folder: Path, *, double: int, single: int, guidance: bool | None, seed: int, sparse: bool, base: dict = FLUX) -> None:
    """A diffusers folder of a FLUX-shaped model (FLUX.1's config, or `base`: another family's without its
    block counts; guidance None: a family whose config has no guidance_embeds): config.json, shards, index;
    random bf16 (or sparse zeros)."""
    config = {**base, "num_layers": double, "num_single_layers": single, **({} if guidance is None else {"guidance_embeds": guidance})}
    shapes = expected_parameters(config, "benchmark config")
    total = sum(math.prod(s) * 2 for s in shapes.values())
    shard_size = max(HUB_SHARD * total // (23_800_000_000), 1)  # the hub's shard/model ratio, scaled down
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, "BF16", shape))
        size += nbytes
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        f = open_safetensors(folder / name, tensors, {"format": "pt"})
        if sparse:
            header = f.size
            f.abort()
            with open(folder / name, "r+b") as raw:
                raw.truncate(header + sum(math.prod(t[2]) * 2 for t in tensors))
        else:
            for _, _, shape in tensors:
                n = math.prod(shape)
                for start in range(0, n, 1 << 24):
                    chunk = torch.randn(min(1 << 24, n - start), generator=gen).mul_(0.02).to(torch.bfloat16)
                    f.write(chunk.view(torch.uint8).numpy())
            f.close()
        weight_map.update({t[0]: name for t in tensors})
    write_json(folder / "diffusion_pytorch_model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    write_json(folder / "config.json", config)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def prepare_cache(mode: str, inputs: list[Path]) -> None:
    if mode == "cold":
        if not drop_caches():
            sys.exit("--cache cold needs root (to write /proc/sys/vm/drop_caches); use --cache warm")
    else:
        drop_caches()
        for p in inputs:
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def run_measured(cmd: list[str], cap_mib: int | None, env: dict | None = None, timeout: float | None = None) -> tuple[float, int | None, int, str]:
    """Wall seconds, peak MiB (cgroup peak with memcap, else the child's max RSS), exit code (TIMEOUT when it
    ran past `timeout` and was killed), output tail."""
    use_cap = cap_mib is not None and MEMCAP.exists() and os.access("/sys/fs/cgroup/memory", os.W_OK)
    full = ([str(MEMCAP), str(cap_mib)] if use_cap else []) + cmd
    start = time.monotonic()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        cgroup = Path(f"/sys/fs/cgroup/memory/memcap.{proc.pid}")  # memcap's cgroup, named by its pid
        peak_bytes = int((cgroup / "memory.max_usage_in_bytes").read_text()) if cgroup.exists() else None
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        if cgroup.exists():
            time.sleep(1)
            cgroup.rmdir()
        return time.monotonic() - start, peak_bytes and peak_bytes >> 20, TIMEOUT, output[-2000:]
    wall = time.monotonic() - start
    m = re.search(r"memcap: .* peak=(\d+)MiB", output)
    if m:
        peak = int(m[1])
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    return wall, peak, code, output[-2000:]


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every child process waited for so far, all its threads and its own
    children included (memcap's command too): the difference around a run is the run's CPU."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def floor_seconds(sources: list[list[Path]], out_bytes: int, scratch: Path, cache: str) -> tuple[float, float, float]:
    """(sequential read s, concurrent read s, write s): cat the sources' files to /dev/null one source after
    the other, then again with the sources concurrently; then write out_bytes to a new file in 16 MiB blocks
    and fsync it."""
    inputs = [p for files in sources for p in files]
    prepare_cache(cache, inputs)
    start = time.monotonic()
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    sequential = time.monotonic() - start
    prepare_cache(cache, inputs)
    start = time.monotonic()
    readers = [subprocess.Popen(["cat", *map(str, files)], stdout=subprocess.DEVNULL) for files in sources]
    if any(r.wait() for r in readers):
        sys.exit("reading the sources failed")
    concurrent = time.monotonic() - start
    drop_caches()
    block = os.urandom(16 << 20)
    path = scratch / "floor.bin"
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = out_bytes
    while left > 0:
        left -= os.write(fd, block[: min(left, len(block))])
    os.fsync(fd)
    os.close(fd)
    write = time.monotonic() - start
    path.unlink()
    drop_caches()
    return sequential, concurrent, write


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every benchmark here shares: the model's size, the sources, the cache, the cap, the scratch folder."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1: 19)")
    ap.add_argument("--single", type=int, default=3, help="single-stream blocks (FLUX.1: 38)")
    ap.add_argument("--full", action="store_true", help="FLUX.1's 19 double and 38 single blocks")
    ap.add_argument("--sparse", action="store_true", help="sparse source files (zeros): for sizes beyond the disk's patience")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--cap", type=int, default=1024, help="memory cap (MiB, page cache included) for fluxrecipe")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary folder under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated sources")
    ap.add_argument("fluxrecipe_args", nargs="*", help="extra overrides for fluxrecipe, e.g. threads=4")
    return ap


def parsed(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path]:
    """The arguments (--full as 19 and 38 blocks) and the scratch folder, made."""
    args = ap.parse_args()
    if args.full:
        args.double, args.single = 19, 38
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="fluxrecipe-bench-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    return args, scratch


def generate_bfl(path: Path, *, double: int, single: int, guidance: bool, seed: int, sparse: bool, base: dict = FLUX) -> None:
    """One BFL file of a FLUX-shaped model (FLUX.1's config, or `base`): random bf16 (or sparse zeros)."""
    from fluxrecipe import families
    from fluxrecipe.formats import bfl

    config = {**base, "num_layers": double, "num_single_layers": single, "guidance_embeds": guidance}
    shapes = expected_parameters(config, "benchmark config")
    tensors = [(t.name, "BF16", t.shape) for t in bfl.out_tensors(shapes, dict.fromkeys(shapes, "BF16"), "", families.recognise(shapes).bfl)]
    f = open_safetensors(path, tensors, {"format": "pt"})
    if sparse:
        header = f.size
        f.abort()
        with open(path, "r+b") as raw:
            raw.truncate(header + sum(math.prod(s) * 2 for _, _, s in tensors))
        return
    gen = torch.Generator().manual_seed(seed)
    for _, _, shape in tensors:
        n = math.prod(shape)
        for start in range(0, n, 1 << 24):
            f.write(torch.randn(min(1 << 24, n - start), generator=gen).mul_(0.02).to(torch.bfloat16).view(torch.uint8).numpy())
    f.close()


SCENARIOS = ("lerp", "fp8", "bfl", "ties", "dare")
METHOD_OPS = {"ties": {"ties": {"density": 0.2}}, "dare": {"dare": {"p": 0.5}}}


def written_bytes(overrides: list[str], out: Path, scratch: Path, env: dict) -> int:
    """The bytes a run will write, from its dry run's plan."""
    dry = run_measured([sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "dry_run=true", f"hydra.run.dir={scratch / 'hydra'}"], None, env=env)
    found = re.search(r"total: .* write ([\d.]+) (B|KB|MB|GB|TB)", dry[3])
    if not found:
        sys.exit(f"no plan from {' '.join(overrides)}:\n{dry[3]}")
    return int(float(found[1]) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[found[2]])


def content_hashes(out: Path) -> list[str]:
    """'sha256  name' of every file an output holds (one file, or a folder's files)."""
    import hashlib

    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    lines = []
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(out.parent)}")
    return lines


def main() -> None:
    import yaml

    ap = arguments(__doc__)
    ap.add_argument("--free-cap", type=int, default=8192, help="a cap (MiB) that does not press: fluxrecipe's natural peak; 0: skip")
    ap.add_argument("--baseline-cap", type=int, default=20480, help="memory cap (MiB) for the baseline")
    ap.add_argument("--baseline-timeout", type=float, default=900, help="seconds before the baseline is stopped (near its cap it thrashes: mmap'd shards are evicted and read again)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of fluxrecipe per scenario and cap (the table shows the median)")
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="which merges to run (default: all)")
    ap.add_argument("--hash", action="store_true", help="print the sha256 of every file each scenario wrote")
    ap.add_argument("--heads", type=int, default=FLUX["num_attention_heads"], help="attention heads of 128 channels (FLUX.1: 24, 3072 wide); fewer: a narrower model, to try the benchmark quickly")
    args, scratch = parsed(ap)
    shape = {**FLUX, "num_attention_heads": args.heads}
    schnell, krea, third, krea_bfl = scratch / "schnell", scratch / "krea", scratch / "dev", scratch / "krea-bfl.safetensors"
    three = {"ties", "dare"} & set(args.scenarios)
    try:
        for folder, guidance, seed in ((schnell, False, 0), (krea, True, 1), *(((third, True, 2),) if three else ())):
            if not (folder / "config.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                generate(folder, double=args.double, single=args.single, guidance=guidance, seed=seed, sparse=args.sparse, base=shape)
        if "bfl" in args.scenarios and not krea_bfl.exists():
            generate_bfl(krea_bfl, double=args.double, single=args.single, guidance=True, seed=1, sparse=args.sparse, base=shape)
        shards = {folder.name: sorted(folder.glob("*.safetensors")) for folder in (schnell, krea, third)}
        model_bytes = json.loads((schnell / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"sources: {'FLUX width' if args.heads == FLUX['num_attention_heads'] else f'{args.heads * 128} wide'}, {args.double} double + {args.single} single blocks, {model_bytes / 2e9:.2f} B parameters, "
              f"{human_bytes(model_bytes)} per source in bf16{' (sparse)' if args.sparse else ''}; cache {args.cache}", flush=True)
        recipes = scratch / "recipes"
        recipes.mkdir(exist_ok=True)
        for method in three:
            recipe = {"sources": {"krea": str(krea), "schnell": str(schnell), "dev": str(third)}, "rules": [{"match": "guidance_embedder", "op": "take:krea"}, {"match": ".*", "op": METHOD_OPS[method]}], "dtype": "bf16"}
            (recipes / f"bench_{method}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        env = {"PYTHONPATH": str(REPO), "FLUXRECIPE_RECIPE_PATH": str(recipes)}
        scenarios = {  # name -> (label, sources read, output name, overrides)
            "lerp": ("lerp: 2 diffusers -> diffusers", [shards["schnell"], shards["krea"]], "merged",
                     ["recipe=krea_schnell", f"recipe.sources.schnell={schnell}", f"recipe.sources.krea={krea}"]),
            "fp8": ("fp8: diffusers -> ComfyUI fp8", [shards["krea"]], "krea-fp8.safetensors", ["recipe=to_comfyui_fp8", f"recipe.sources.model={krea}"]),
            "bfl": ("BFL -> diffusers", [[krea_bfl]], "krea-diffusers", ["recipe=to_diffusers", f"recipe.sources.model={krea_bfl}"]),
            "ties": ("TIES: 3 diffusers -> diffusers", [shards["krea"], shards["schnell"], shards["dev"]], "merged-ties", ["recipe=bench_ties"]),
            "dare": ("DARE: 3 diffusers -> diffusers", [shards["krea"], shards["schnell"], shards["dev"]], "merged-dare", ["recipe=bench_dare"]),
        }
        rows, hashes = [], []
        for name in args.scenarios:
            label, sources, out_name, overrides = scenarios[name]
            out = scratch / out_name
            out_bytes = written_bytes(overrides, out, scratch, env)
            read_seq, read_par, write_s = floor_seconds(sources, out_bytes, scratch, args.cache)
            floors = (read_seq + write_s, read_par + write_s)
            inputs = [p for files in sources for p in files]
            hashes_of: dict[str, list[str]] = {}

            def merge(cap: int) -> tuple[float, float, int | None, int, float, float]:
                walls, phases, cpus, peak, rc, reads = [], [], [], 0, 0, math.nan
                for i in range(args.repeat):
                    prepare_cache(args.cache, inputs)
                    cmd = [sys.executable, "-m", "fluxrecipe", *overrides, f"output={out}", "progress=false", f"hydra.run.dir={scratch / 'hydra'}", *args.fluxrecipe_args]
                    cpu = children_cpu_seconds()
                    wall, p, rc, tail = run_measured(cmd, cap, env=env)
                    cpus.append(children_cpu_seconds() - cpu)
                    walls.append(wall)
                    phase = re.search(r"wrote .* in ([\d.]+) s \(", tail)
                    phases.append(float(phase[1]) if phase else math.nan)
                    passes = re.search(r"from the sources: ([\d.]+) times their bytes", tail)  # logged only beyond one read
                    reads = float(passes[1]) if passes else (1.0 if phase else math.nan)
                    peak = max(peak, p or 0)
                    if args.hash and i == 0 and not rc and not hashes_of.get(name):
                        hashes_of[name] = content_hashes(out)
                    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
                    if rc:
                        print(f"{label}: fluxrecipe failed (exit {rc}):\n{tail}", file=sys.stderr)
                        break
                middle = sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]
                return walls[middle], phases[middle], peak, rc, reads, cpus[middle]

            for cap in (args.cap, *((args.free_cap,) if args.free_cap else ())):
                wall, phase, peak, rc, reads, cpu = merge(cap)
                rows.append((f"{label}, cap {cap} MiB" + (f" (median of {args.repeat})" if args.repeat > 1 else ""), floors, wall, phase, peak, rc, reads, cpu))
                print(f"  {rows[-1][0]}: floor {floors[0]:.1f} / {floors[1]:.1f} s, wall {wall:.1f} s, merge {phase:.1f} s, CPU {cpu:.1f} s, reads {reads:.2f}x, peak {peak} MiB, exit {rc}", flush=True)
            hashes += hashes_of.get(name, [])
            if name == "lerp" and not args.no_baseline:
                baseline_out = scratch / "baseline"
                prepare_cache(args.cache, inputs)
                cpu = children_cpu_seconds()
                wall, p, brc, err = run_measured([sys.executable, str(REPO / "benchmarks" / "seed_baseline.py"), str(schnell), str(krea), str(baseline_out)], args.baseline_cap, timeout=args.baseline_timeout)
                cpu = children_cpu_seconds() - cpu
                shutil.rmtree(baseline_out, ignore_errors=True)
                rows.append((f"lerp by the seed-style baseline, cap {args.baseline_cap} MiB", floors, wall, math.nan, p, brc, math.nan, cpu))
                if brc not in (0, TIMEOUT):
                    print(f"baseline failed (exit {brc}{', killed for memory' if brc == 137 else ''}):\n{err[-400:]}", file=sys.stderr)

        print()
        print("floor: the scenario's reads (one source after the other / concurrently) + its write (fsync); wall: the whole command")
        print("(start-up included); merge: the merge itself, as fluxrecipe logs it; CPU: the whole command's user + system seconds, all")
        print(f"threads (on {os.cpu_count()} cores the wall is at least CPU / {os.cpu_count()}); reads: the sources' bytes read, in times their size")
        print("| run | floor s (sequential / concurrent) | wall s | wall / floor (seq, conc) | merge s | merge / floor (conc) | CPU s | reads | peak MiB | exit |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for label, (floor_seq, floor_par), wall, phase, peak, code, reads, cpu in rows:
            status = {0: "ok", 137: "killed (memory)", TIMEOUT: f"stopped at its time limit ({wall:.0f} s)"}.get(code, f"failed ({code})")
            merge_cols = f"{phase:.1f} | {phase / floor_par:.2f}" if not math.isnan(phase) else "- | -"
            print(f"| {label} | {floor_seq:.1f} / {floor_par:.1f} | {wall:.1f} | {wall / floor_seq:.2f}, {wall / floor_par:.2f} | {merge_cols} | {cpu:.1f} | {'-' if math.isnan(reads) else f'{reads:.2f}x'} | {peak or '-'} | {status} |")
        if hashes:
            print()
            print("\n".join(hashes))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
