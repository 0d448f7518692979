"""One job as the command line asks for it: its plan printed (a dry run), or the merge, then its previews,
then `keep_weights`.

A job runs on the check and plan its pre-flight made (a sweep's before any job starts, a single run's before
Hydra makes its run folder: cli/preflight.py), so a wrong preview setting or an unreachable pipeline costs
seconds, not a merge, and nothing is planned twice. `keep_weights=false` deletes the weight files the merge
wrote once its previews are done (or failed): the folder keeps config.json, the model card, `recipe.yaml`
(which rebuilds the weights byte for byte), the provenance, the diagnostics and the manifest (the sha256 of
every deleted file, so a rebuild can be checked against it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from .. import api
from ..errors import FileError
from ..files import os_errors
from ..formats.diffusers import INDEX_NAME
from ..package import RECIPE_NAME
from ..plan import Plan, format_plan, human_bytes
from ..sweep import previews
from ..sweep.preflight import JobCheck, JobPlan
from ..text import printable
from ..writer import fsync_dir
from .preflight import checked_job, job_folder

if TYPE_CHECKING:
    from ..execute import Result

log = logging.getLogger("fluxrecipe")


def run_config(cfg: DictConfig, multirun: bool = False) -> Result | Plan:
    """The job `cfg` asks for, in its Hydra job folder: checked (or its pre-flight's check found), then run."""
    return run(checked_job(cfg, job_folder(cfg), multirun))


def run(check: JobCheck) -> Result | Plan:
    """A checked job: its plan printed (dry run), or merged, previewed and its weights dropped if asked."""
    if check.dry_run:
        return print_dry_run(check)
    with os_errors():
        result = merge(check.job)
    try:
        if check.previews is not None:
            previews.render(result.output, check.previews, check.device, check.folder / previews.PREVIEW_DIR)
    finally:
        if not check.keep_weights:
            drop_weights(result)
    return result


def print_dry_run(check: JobCheck) -> Plan:
    """A dry run's answer: the plan, where the output and the previews would go. A single run's pre-flight
    prints it before Hydra makes the run folder, so a dry run writes nothing at all."""
    job = check.job
    text = []
    if check.previews is not None:
        text.append(f"previews: {check.previews.describe()}; into {check.folder / previews.PREVIEW_DIR}")
    shown = printable(str(job.output))
    text += [format_plan(job.plan), f"dry run: nothing written (the output would go to {shown})"]
    if job.output.exists() and not job.options.overwrite:
        text.append(f"note: {shown} already exists: the merge will refuse it unless you pass overwrite=true")
    try:
        print("\n".join(text), flush=True)
    except OSError as e:
        raise FileError(f"standard output: {e.strerror or e}") from None
    return job.plan


def merge(job: JobPlan) -> Result:
    """The planned merge, written to its output, and what it did said in the log."""
    plan, output = job.plan, job.output
    shown = printable(str(output))
    log.info(format_plan(plan))
    result = api.write(plan, output, job.options)
    rate = result.bytes_written / result.seconds if result.seconds else 0.0
    where = shown if plan.single_file else f"{shown}: {len(plan.steps)} tensors in {len(plan.files)} shard(s)"
    if plan.factors:
        log.info(format_lora_errors(plan, result))
    if plan.lora_space:
        from ..lora_space import format_errors

        log.info(format_errors(plan, result))
    log.info(f"wrote {where}, {human_bytes(result.bytes_written)} in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    report = shown if plan.single_file else f"{shown}/fluxrecipe.json"
    inputs = {k: v for k, v in result.nonfinite.items() if not k.startswith("output: ")}
    if inputs:
        log.warning(f"warning: {sum(inputs.values())} NaN/Inf input values in {len(inputs)} tensor(s), listed in {report}")
    if len(inputs) != len(result.nonfinite):
        outputs = len(result.nonfinite) - len(inputs)
        log.warning(f"warning: {outputs} tensor(s) came out with NaN/Inf values from finite inputs, listed in {report}: do not use the model as it is")
    if result.clamped:
        log.warning(f"warning: {sum(result.clamped.values())} values in {len(result.clamped)} tensor(s) lay beyond their dtype's finite range and were clamped to it, listed in {report}")
    return result


def format_lora_errors(plan: Plan, result: Result) -> str:
    """A merge written as a LoRA: the relative error of each factored matrix, and what the LoRA could not hold."""
    lines = [f"lora: rank {plan.lora_rank}; relative error ||difference - up @ down|| / ||difference|| of each matrix, after rounding to {plan.files[0].tensors[0].dtype}:"]
    width = max((len(f.module) for f in plan.factors), default=0)
    lines += [f"  {f.module:<{width}}  rank {result.lora_ranks.get(f.module, f.rank):>4}  {result.lora_errors[f.module]:.3e}" for f in plan.factors if f.rank]
    differ = {k: v for k, v in result.lora_unheld.items() if v}
    if result.lora_unheld:
        worst = max(differ, key=differ.get, default=None)
        lines.append(
            f"not held by the LoRA (1-D): {len(differ)} of {len(result.lora_unheld)} tensors differ from the base"
            + (f", the most '{worst}' (largest |difference| {differ[worst]:.3e})" if worst else "")
        )
    return "\n".join(lines)


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
