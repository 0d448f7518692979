"""One job as the command line asks for it: the merge (run.run_job), then its previews, then `keep_weights`.

A single run with `preview=true` is checked like a sweep's job before anything is merged (preflight.py), so a
wrong preview setting or an unreachable pipeline costs seconds, not a merge. `keep_weights=false` deletes the
weight files the merge wrote once its previews are done (or failed): the folder keeps config.json, the model
card, `recipe.yaml` (which rebuilds the weights byte for byte), the provenance, the diagnostics and the
manifest (the sha256 of every deleted file, so a rebuild can be checked against it).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import preview
from .errors import UsageError
from .formats.diffusers import INDEX_NAME
from .plan import Plan, human_bytes

if TYPE_CHECKING:
    from .execute import Result

log = logging.getLogger("fluxrecipe")


def run(cfg: DictConfig) -> Result | Plan:
    from .preflight import check_single
    from .run import run_job
    from .sweep import in_multirun

    keep = keep_weights(cfg)
    previews = preview.enabled(cfg)
    if (previews or not keep) and not in_multirun():  # a sweep's pre-flight has checked every job already
        settings = check_single(cfg)
        if cfg.dry_run and settings is not None:
            print(f"previews: {settings.describe()}; into {job_folder() / preview.PREVIEW_DIR}")
    value = run_job(cfg)
    if isinstance(value, Plan):  # a dry run
        return value
    try:
        if previews:
            config = json.loads((value.output / "config.json").read_text())
            settings = preview.settings_of(cfg, bool(config.get("guidance_embeds")))
            preview.render(value.output, settings, str(cfg.device), job_folder() / preview.PREVIEW_DIR)
    finally:
        if not keep:
            drop_weights(value)
    return value


def keep_weights(cfg: DictConfig) -> bool:
    value = cfg.get("keep_weights", True)
    if not isinstance(value, bool):
        raise UsageError(f"keep_weights={value}: choose true or false")
    return value


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
    fd = os.open(result.output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info(
        f"keep_weights=false: deleted the weights of {result.output} ({len(names)} files, {human_bytes(freed)}); "
        f"its recipe.yaml rebuilds them: FLUXRECIPE_RECIPE_PATH={result.output} python -m fluxrecipe recipe=recipe output=DIR"
    )
