"""One job as the command line asks for it: its plan printed (a dry run), or the merge, then its previews,
then `keep_weights`.

A job runs on the check and plan its pre-flight made (a sweep's before any job starts, a single run's before
Hydra makes its run folder: cli/preflight.py), so a wrong preview setting or an unreachable pipeline costs
seconds, not a merge, and nothing is planned twice. `keep_weights=false` with previews merges into memory and
renders from there (a candidate: its weights are never written); without previews (a sweep), it deletes the
weight files once written. Either way the folder keeps config.json, the model card, `recipe.yaml` (which
writes the weights byte for byte), the provenance, the diagnostics and the manifest (the sha256 of every
weight file, written or not, so a rebuild can be checked against it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import shutil
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from .. import api
from ..errors import FileError
from ..files import os_errors
from ..formats.diffusers import INDEX_NAME
from ..package import RECIPE_NAME
from ..plan import Plan, format_plan, human_bytes
from ..recipe import Recipe, load_recipe
from ..sweep import previews, scores
from ..sweep.preflight import JobCheck, JobPlan, plan_job
from ..sweep.settings import JobSettings, OutputSettings
from ..text import printable
from ..writer import fsync_dir, replace_json
from .options import BY_NAME
from .preflight import checked_job, job_folder

if TYPE_CHECKING:
    from ..execute import Result

log = logging.getLogger("fluxrecipe")


def run_config(cfg: DictConfig, multirun: bool = False) -> Result | Plan:
    """The job `cfg` asks for, in its Hydra job folder: checked (or its pre-flight's check found), then run."""
    return run(checked_job(cfg, job_folder(cfg), multirun))


def run(check: JobCheck) -> Result | Plan:
    """A checked job: its plan printed (dry run), or merged, previewed and its weights dropped if asked; a
    job with previews whose weights are not kept merges in memory, and nothing of its weights is written."""
    if check.dry_run:
        return print_dry_run(check)
    if check.in_memory:
        result = run_in_memory(check)
    else:
        with os_errors():
            result = merge(check.job)
        try:
            if check.previews is not None:
                previews.render(result.output, check.previews, check.device, check.folder / previews.PREVIEW_DIR)
        finally:
            if not check.keep_weights:
                drop_weights(result)
    if check.scoring is not None:
        image_scores = scores.score_previews(check.folder / previews.PREVIEW_DIR, check.scoring, check.device)
        parents = [parent_scores(check, source) for source in check.scoring.reference]
        scores.write_scores(check.folder, scores.job_scores(image_scores, check.scoring, parents))
    return result


def run_in_memory(check: JobCheck) -> Result:
    """Previews of a merge that is never written: the pipeline's text encoders and VAE first (once per process),
    then the merge into memory, straight into the transformer that renders. The job's model folder holds the
    rest (recipe.yaml, which writes the weights, and the manifest, with the sha256 of every shard they make)."""
    job = check.job
    previews.prepare(check.previews, check.device)
    log.info(format_plan(job.plan))
    with os_errors():
        result, tensors = api.merge_in_memory(job.plan, job.output, job.options)
    weights = sum(r.size for name, r in result.files.items() if not (result.output / name).exists())
    rate = job.plan.bytes_written / result.seconds if result.seconds else 0.0
    log.info(f"merged {len(job.plan.steps)} tensors in memory, {human_bytes(weights)} of weights not written, in {result.seconds:.1f} s ({human_bytes(rate)}/s)")
    report_counts(job.plan, result)
    previews.render(previews.InMemoryModel(tensors, job.plan.config), check.previews, check.device, check.folder / previews.PREVIEW_DIR)
    log.info(f"keep_weights=false: the weights of {result.output} were never written; {rebuild_hint(result)}")
    return result


def parent_scores(check: JobCheck, source: str) -> list[dict]:
    """The scores of the unmerged `source` on the job's prompts and seeds: rendered and scored once per sweep
    (the first job that needs them, under a lock, others wait and read them), its weights deleted after."""
    folder = check.references / scores.reference_name(source, check.previews, check.scoring)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = scores.read_scores(folder)
        if done is None:
            shutil.rmtree(folder, ignore_errors=True)  # what a job that was stopped half-way left
            recipe = parent_recipe(check.job.recipe, source)
            output = OutputSettings(None, "diffusers", api.parse_size(BY_NAME["shard_size"].default), BY_NAME["lora_rank"].default)
            plan = plan_job(JobSettings(recipe, check.job.options, output, None), folder)
            log.info(f"preview.reference: rendering and scoring the unmerged {source} into {folder}")
            with os_errors():
                result = api.write(plan.plan, plan.output, plan.options)
            try:
                previews.render(result.output, check.previews, check.device, folder / previews.PREVIEW_DIR)
            finally:
                shutil.rmtree(result.output)
            done = {"source": source, "image_scores": scores.score_previews(folder / previews.PREVIEW_DIR, check.scoring, check.device)}
            replace_json(folder / scores.SCORES_JSON, done)
    return done["image_scores"]


def parent_recipe(recipe: Recipe, source: str) -> Recipe:
    """A recipe that writes `source` alone, unmerged, in the recipe's dtype (the job's parent)."""
    data = {"sources": {source: recipe.resolved["sources"][source]}, "base": source, "rules": [{"match": ".*", "op": f"take:{source}"}], "dtype": recipe.dtype}
    alone = load_recipe(data, f"{recipe.name}-{source}")
    return dataclasses.replace(alone, sources={source: recipe.sources[source]})


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
    if plan.bytes_read and result.bytes_read > plan.bytes_read:  # statistics passes (TIES, slerp, ...) read the sources again
        log.info(f"read {human_bytes(result.bytes_read)} from the sources: {result.bytes_read / plan.bytes_read:.2f} times their bytes")
    report_counts(plan, result)
    return result


def report_counts(plan: Plan, result: Result) -> None:
    """Warnings for what the merge counted: NaN/Inf read or made, values clamped (listed in the provenance)."""
    shown = printable(str(result.output))
    report = shown if plan.single_file else f"{shown}/fluxrecipe.json"
    inputs = {k: v for k, v in result.nonfinite.items() if not k.startswith("output: ")}
    if inputs:
        log.warning(f"warning: {sum(inputs.values())} NaN/Inf input values in {len(inputs)} tensor(s), listed in {report}")
    if len(inputs) != len(result.nonfinite):
        outputs = len(result.nonfinite) - len(inputs)
        log.warning(f"warning: {outputs} tensor(s) came out with NaN/Inf values from finite inputs, listed in {report}: do not use the model as it is")
    if result.clamped:
        log.warning(f"warning: {sum(result.clamped.values())} values in {len(result.clamped)} tensor(s) lay beyond their dtype's finite range and were clamped to it, listed in {report}")


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
        f"keep_weights=false: deleted the weights of {result.output} ({len(names)} files, {human_bytes(freed)}); {rebuild_hint(result)}"
    )


def rebuild_hint(result: Result) -> str:
    return f"its recipe.yaml writes them: fluxrecipe recipe={result.output / RECIPE_NAME} output=DIR"
