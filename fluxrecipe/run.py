"""One merge job, from a composed Hydra config: recipe -> plan -> execution -> report."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .catalog import recipe_files
from .errors import UsageError
from .options import Options
from .plan import Plan, format_plan, human_bytes, make_plan
from .recipe import Recipe, load_recipe
from .sources import Checkpoint, open_source
from .writer import check_target

if TYPE_CHECKING:
    from .execute import Result

log = logging.getLogger("fluxrecipe")
SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class JobPlan:
    """Everything a job decides before reading a tensor: what to merge (the Plan), how, and where to."""

    recipe: Recipe
    options: Options
    output: Path
    plan: Plan


def plan_job(cfg: DictConfig, dry_run: bool = False) -> JobPlan:
    """Check the config and plan its merge: every check a run makes before it reads or writes tensor data.
    A sweep's pre-flight calls this for every job before any job starts."""
    recipe = recipe_of(cfg)
    options = options_of(cfg)
    output = output_of(cfg)
    shard_size = parse_size(cfg.shard_size)
    if not dry_run:
        check_target(output, options.overwrite)  # before fetching anything: an existing output fails fast
    checkpoints = {name: open_source(spec) for name, spec in recipe.sources.items()}
    plan = make_plan(recipe, checkpoints, shard_size)
    _check_apart(output, checkpoints)  # a dry run reports every fault the real run would meet before writing
    return JobPlan(recipe, options, output, plan)


def run_job(cfg: DictConfig) -> Result | Plan:
    """Plan the merge the config asks for; print it (dry run) or execute it. Returns the Plan or the Result."""
    job = plan_job(cfg, dry_run=bool(cfg.dry_run))
    plan, options, output = job.plan, job.options, job.output
    if cfg.dry_run:
        print(format_plan(plan))
        print(f"dry run: nothing written (the output would go to {output})")
        if output.exists() and not options.overwrite:
            print(f"note: {output} already exists: the merge will refuse it unless you pass overwrite=true")
        return plan
    log.info(format_plan(plan))
    from .execute import execute  # torch: only a run that merges pays for importing it

    result = execute(plan, output, options)
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    log.info(f"wrote {output}: {len(plan.steps)} tensors in {len(plan.shards)} shard(s), {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    if result.nonfinite:
        total = sum(result.nonfinite.values())
        log.warning(f"warning: {total} NaN/Inf input values in {len(result.nonfinite)} tensor(s), listed in {output / 'fluxrecipe.json'}")
    return result


def recipe_of(cfg: DictConfig) -> Recipe:
    if cfg.get("recipe") is None:
        names = ", ".join(sorted(recipe_files()))
        raise UsageError(f"no recipe chosen: run `python -m fluxrecipe recipe=NAME` (recipes: {names})")
    name = HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None
    name = name or "recipe"
    file = recipe_files().get(name)
    return load_recipe(cfg.recipe, name, str(file) if file else None)


def options_of(cfg: DictConfig) -> Options:
    if cfg.nonfinite not in ("error", "warn"):
        raise UsageError(f"nonfinite={cfg.nonfinite}: choose error or warn")
    for key in ("threads", "chunk_elements"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < (0 if key == "threads" else 1):
            raise UsageError(f"{key}={cfg[key]}: must be a whole number" + (" (0: automatic)" if key == "threads" else " above 0"))
    return Options(
        device=str(cfg.device),
        threads=cfg.threads,
        chunk_elements=cfg.chunk_elements,
        nonfinite=cfg.nonfinite,
        diagnostics=bool(cfg.diagnostics),
        progress=bool(cfg.progress),
        overwrite=bool(cfg.overwrite),
    )


def output_of(cfg: DictConfig) -> Path:
    if cfg.output:
        return Path(os.path.abspath(os.path.expanduser(str(cfg.output))))
    return Path(HydraConfig.get().runtime.output_dir) / "transformer"


def parse_size(text: object) -> int:
    m = SIZE.fullmatch(str(text).strip())
    if not m:
        raise UsageError(f"shard_size={text}: give a size such as 10GB, 500MB or 2GiB")
    size = int(float(m[1]) * UNITS[(m[2] or "B").upper()])
    if size <= 0:
        raise UsageError(f"shard_size={text}: must be above 0")
    return size


def _check_apart(output: Path, checkpoints: dict[str, Checkpoint]) -> None:
    """The output may not overwrite or sit inside a source, nor hold one."""
    out = output.resolve()
    for c in checkpoints.values():
        src = Path(c.folder).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise UsageError(f"output {output} and source '{c.name}' ({c.folder}) overlap: write the merge somewhere else")
