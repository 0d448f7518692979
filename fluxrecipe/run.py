"""One merge job, from a composed Hydra config: recipe -> plan -> execution -> report (through api.py)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import api
from .catalog import recipe_files
from .errors import UsageError
from .formats import OUTPUT_FORMATS
from .options import Options
from .plan import Plan, format_plan, human_bytes
from .recipe import FORMATS, Recipe, load_recipe
from .writer import check_target

if TYPE_CHECKING:
    from .execute import Result

log = logging.getLogger("fluxrecipe")


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
    output_format = format_of(cfg, recipe)
    output = api.output_path(output_of(cfg, recipe, output_format), output_format)
    if not dry_run:  # an existing output fails fast, before any source is fetched
        check_target(output, options.overwrite, single_file=OUTPUT_FORMATS[output_format])
    plan = api.plan(recipe, output, output_format, parse_size(cfg.shard_size))
    api.check_output(plan, output, options.overwrite, dry_run)  # a dry run reports every fault but an existing output
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
    result = api.write(plan, output, options)
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    where = output if plan.single_file else f"{output}: {len(plan.steps)} tensors in {len(plan.files)} shard(s)"
    log.info(f"wrote {where}, {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    report = output if plan.single_file else output / "fluxrecipe.json"
    inputs = {k: v for k, v in result.nonfinite.items() if not k.startswith("output: ")}
    if inputs:
        log.warning(f"warning: {sum(inputs.values())} NaN/Inf input values in {len(inputs)} tensor(s), listed in {report}")
    if len(inputs) != len(result.nonfinite):
        outputs = len(result.nonfinite) - len(inputs)
        log.warning(f"warning: {outputs} tensor(s) came out with NaN/Inf values from finite inputs, listed in {report}")
    if result.clamped:
        log.warning(f"warning: {sum(result.clamped.values())} values in {len(result.clamped)} tensor(s) lay beyond their dtype's finite range and were clamped to it, listed in {report}")
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
        in_flight=parse_size(cfg.in_flight, "in_flight"),
        nonfinite=cfg.nonfinite,
        diagnostics=bool(cfg.diagnostics),
        progress=bool(cfg.progress),
        overwrite=bool(cfg.overwrite),
    )


def format_of(cfg: DictConfig, recipe: Recipe) -> str:
    chosen = cfg.get("format") or recipe.format or "diffusers"
    if chosen not in FORMATS:
        raise UsageError(f"format={chosen}: choose one of {', '.join(FORMATS)}")
    return chosen


def output_of(cfg: DictConfig, recipe: Recipe, output_format: str) -> Path:
    if cfg.output:
        return Path(os.path.abspath(os.path.expanduser(str(cfg.output))))
    name = f"{recipe.name}.safetensors" if OUTPUT_FORMATS[output_format] else "transformer"
    return Path(HydraConfig.get().runtime.output_dir) / name


def parse_size(text: object, option: str = "shard_size") -> int:
    try:
        return api.parse_size(text)
    except UsageError as e:
        raise UsageError(f"{option}={e}") from None
