"""One job as the command line asks for it: the merge (run.execute_job), then its previews, then `keep_weights`.

A job runs on the check and plan its pre-flight made (preflight.py: a sweep's before any job starts, a single
run's before Hydra makes its run folder), so a wrong preview setting or an unreachable pipeline costs seconds,
not a merge, and nothing is planned twice. `keep_weights=false` deletes the weight files the merge wrote once
its previews are done (or failed): the folder keeps config.json, the model card, `recipe.yaml` (which rebuilds
the weights byte for byte), the provenance, the diagnostics and the manifest (the sha256 of every deleted
file, so a rebuild can be checked against it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import preview
from .formats.diffusers import INDEX_NAME
from .package import RECIPE_NAME
from .plan import Plan, human_bytes
from .writer import fsync_dir

if TYPE_CHECKING:
    from .execute import Result
    from .preflight import JobCheck

log = logging.getLogger("fluxrecipe")


def run(cfg: DictConfig) -> Result | Plan:
    from .preflight import checked_job
    from .run import dry_run_of, execute_job

    check = checked_job(cfg, job_folder())
    if dry_run_of(cfg):
        return print_dry_run(check)
    value = execute_job(check.job, dry_run=False)
    try:
        if check.previews is not None:
            preview.render(value.output, check.previews, str(cfg.device), job_folder() / preview.PREVIEW_DIR)
    finally:
        if not check.keep_weights:
            drop_weights(value)
    return value


def print_dry_run(check: JobCheck) -> Plan:
    """A dry run's answer: the plan, where the output and the previews would go. A single run's pre-flight
    prints it before Hydra makes the run folder, so a dry run writes nothing at all."""
    from .run import execute_job

    if check.previews is not None:
        print(f"previews: {check.previews.describe()}; into {check.folder / preview.PREVIEW_DIR}")
    return execute_job(check.job, dry_run=True)


def keep_weights(cfg: DictConfig) -> bool:
    from .run import boolean

    return boolean(cfg.get("keep_weights", True), "keep_weights")


def job_folder() -> Path:
    """The job's own folder (Hydra's run or sweep-job dir): previews go there, not into the model folder."""
    return Path(HydraConfig.get().runtime.output_dir)


def drop_weights(result: Result) -> None:
    """Delete the weight files this merge wrote (its shards and index), nothing else."""
    names = [name for name in result.files if name.endswith(".safetensors") or name == INDEX_NAME]
    freed = 0
    for name in names:
        path = result.output / name
        freed += path.stat().st_size
        path.unlink()
    fsync_dir(result.output)
    log.info(
        f"keep_weights=false: deleted the weights of {result.output} ({len(names)} files, {human_bytes(freed)}); "
        f"its recipe.yaml rebuilds them: fluxrecipe recipe={result.output / RECIPE_NAME} output=DIR"
    )
