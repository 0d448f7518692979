"""The pre-flight: every check a job, and a sweep as a whole, can make before a tensor is read.

A job is planned (sources opened, rules decided, the output's place checked: `plan_job`), its previews are
worked out for the merged model and their pipeline checked, and what does not fit together is said (a one-file
format with previews, keep_weights=false with nothing to keep). A sweep is then checked as a whole: a folder per
job, the launcher, and the disk of every model it keeps (with `keep_weights=false` and previews, none: those
are merged in memory; without previews, only those that exist at once) against the free space of the sweep
folder. Every problem of every job is reported in one message,
and then nothing is launched and no folder is made.

A single run's pre-flight (before Hydra makes its run folder) and a sweep's (before the launcher gets any job)
are these same checks; the command layer (cli/preflight.py) reads each job's settings from Hydra's config and
hands them here, and the job then runs on the plan made here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import api
from ..errors import FluxRecipeError, UsageError
from ..files import os_errors
from ..options import Options
from ..plan import Plan, human_bytes
from ..recipe import Recipe
from ..text import counted
from ..writer import check_target
from .previews import PREVIEW_DIR, PreviewSettings, pipeline_problems
from .scores import ScoreRequest, scorer_problems
from .settings import JobSettings

EXIT_PROBLEMS = 1
SIDE_FILES = 4 << 20  # config, card, recipe, provenance, diagnostics, manifest, shard headers: a bound
SHOWN_JOBS = 4  # job names listed for a problem several jobs share


@dataclass(frozen=True)
class JobPlan:
    """Everything a job decides before reading a tensor: what to merge (the Plan), how, and where to."""

    recipe: Recipe
    options: Options
    output: Path
    plan: Plan


def plan_job(settings: JobSettings, folder: Path) -> JobPlan:
    """Plan the job's merge into its output (the one asked for, else in `folder`): every check a run makes
    before it reads or writes tensor data. A dry run plans hub sources from their headers (nothing
    downloaded) and reports every fault but an existing output."""
    recipe, options, output = settings.recipe, settings.options, settings.output
    with os_errors():
        target = api.output_path(output.in_folder(folder, recipe), output.format)
        check_target(target, options.overwrite, single_file=output.single_file, dry_run=settings.dry_run)  # before any source is fetched
        plan = api.plan(recipe, target, output.format, output.shard_size, output.lora_rank, download=not settings.dry_run, lora_energy=output.lora_energy, gguf_type=output.gguf_type)
        api.check_output(plan, target, options.overwrite, dry_run=True)  # apart from every source (the target was checked above)
        return JobPlan(recipe, options, target, plan)


@dataclass(frozen=True)
class Launcher:
    """What the pre-flight needs to know of a sweep's launcher (the command layer reads it from Hydra's)."""

    target: str  # its class, as hydra.launcher._target_ names it
    n_jobs: Any = None  # joblib: jobs at once (-1 one per core, -2 all but one, ...)
    array_parallelism: Any = None  # submitit: jobs of the array at once

    @property
    def in_process(self) -> bool:
        """Every job runs in this process (Hydra's basic launcher), one after the other."""
        return self.target.endswith("BasicLauncher")

    @property
    def on_cluster(self) -> bool:
        """The jobs run on other machines (SLURM), which may have the GPU that the launching one lacks."""
        return "slurm" in self.target.lower()

    def at_once(self, jobs: int) -> int:
        """How many jobs it runs at the same time (each holds a model until it is done)."""
        if self.in_process:
            return 1
        if isinstance(self.n_jobs, int) and not isinstance(self.n_jobs, bool) and self.n_jobs != 0:
            return self.n_jobs if self.n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + self.n_jobs)
        parallelism = self.array_parallelism
        return parallelism if isinstance(parallelism, int) and not isinstance(parallelism, bool) and parallelism > 0 else jobs

    def problems(self) -> list[str]:
        """A launcher that cannot start here fails only once the sweep folder exists (submitit looks for
        SLURM's `srun` as it starts): say it before."""
        if self.target.endswith("SlurmLauncher") and shutil.which("srun") is None:
            return ["hydra/launcher=slurm: this machine has no SLURM (no `srun` on the PATH): launch the sweep from a node of the cluster, "
                    "or run it here with hydra/launcher=basic (the default), joblib or submitit_local"]
        return []


@dataclass
class JobCheck:
    """One job (of a sweep, or a single run) as checked and planned before it runs."""

    num: int
    name: str  # its folder relative to the sweep folder, or its overrides where it could not be composed
    folder: Path | None
    job: JobPlan | None = None  # when the job could be planned
    previews: PreviewSettings | None = None
    scoring: ScoreRequest | None = None
    references: Path | None = None  # where the parents' reference previews go (preview.reference): the sweep's folder
    keep_weights: bool = True
    dry_run: bool = False
    device: str = "cpu"
    problems: list[str] = field(default_factory=list)
    task: dict | None = None  # the job's config as plain data: which job this check is for (cli/preflight.py)
    cause: FluxRecipeError | None = None  # the planner's error, for traceback=true

    @property
    def in_memory(self) -> bool:
        """Merged into memory for its previews, its weights never written (keep_weights=false: cli/job.py)."""
        return self.previews is not None and not self.keep_weights

    @property
    def model_bytes(self) -> int:
        """What its model folder takes on disk at most."""
        if self.job is None:
            return 0
        return SIDE_FILES if self.in_memory else self.job.plan.bytes_written + SIDE_FILES


class PipelineChecks:
    """previews.pipeline_problems once per pipeline and model shape, scores.scorer_problems once per set of
    scorers: every job of a sweep usually shares them."""

    def __init__(self) -> None:
        self.done: dict[tuple, list[str]] = {}

    def __call__(self, settings: PreviewSettings, config: dict[str, Any], fetch: bool) -> list[str]:
        key = (settings.pipeline, settings.kind, fetch, *(config.get(f.model_key) for f in settings.kind.fits))
        if key not in self.done:
            self.done[key] = pipeline_problems(settings, config, fetch)
        return self.done[key]

    def scorers(self, request: ScoreRequest, fetch: bool) -> list[str]:
        key = ("scorers", request.scores, request.clip, request.aesthetic, fetch)
        if key not in self.done:
            self.done[key] = scorer_problems(request, fetch)
        return self.done[key]


def check_job(settings: JobSettings, check: JobCheck, launcher: Launcher | None, pipelines: PipelineChecks | None) -> JobCheck:
    """Every problem of one job that can be found without reading a tensor, into `check.problems`.
    `launcher`: the sweep's, None for a single run. `pipelines`: None leaves the preview pipeline unchecked
    (a sweep's pre-flight checked it for every job)."""
    problems, multirun = check.problems, launcher is not None
    check.keep_weights, check.dry_run, check.device = settings.keep_weights, settings.dry_run, settings.options.device
    wants_previews = settings.previews is not None
    try:
        check.job = plan_job(settings, check.folder)
    except FluxRecipeError as e:
        problems.append(str(e))
        check.cause = e
    if check.job is not None and check.job.plan.single_file and (wants_previews or not settings.keep_weights):
        problems.append(
            f"format={check.job.plan.format} writes one file; "
            + ("previews load the merged model as a diffusers folder" if wants_previews else "keep_weights=false keeps the folder's recipe.yaml, which one file has no room for")
            + f": {'sweep' if multirun else 'merge'} with format=diffusers (the default), then convert the merge you choose (its recipe.yaml, with format=...)"
        )
    elif not multirun and not settings.keep_weights and not wants_previews:
        problems.append("keep_weights=false deletes a merge's weights once its previews are done: without preview=true it would delete the merge as soon as it is written")
    elif wants_previews and check.job is not None:
        config = check.job.plan.config
        try:
            check.previews = settings.previews.for_model(check.job.plan.family, config)
        except FluxRecipeError as e:  # reading preview.pipeline's model_index.json: the hub's errors too
            problems.append(str(e))
        if check.previews is not None and pipelines is not None:
            problems += pipelines(check.previews, config, fetch=not settings.dry_run)
        check.scoring = settings.scoring
        if settings.scoring is not None:
            problems += _scoring_problems(settings, pipelines)
        if check.previews is not None and (check.folder / PREVIEW_DIR).exists():
            problems.append(f"{check.folder / PREVIEW_DIR} already exists (an earlier run in this folder): choose another " + ("hydra.sweep.dir" if multirun else "hydra.run.dir"))
    if multirun and not launcher.on_cluster and check.device != "cpu":
        problems += _device_problems(check.device)
    return check


def _scoring_problems(settings: JobSettings, pipelines: PipelineChecks | None) -> list[str]:
    """The scorers' models (where `pipelines` checks models), and preview.reference's names: sources of the recipe."""
    request = settings.scoring
    problems = pipelines.scorers(request, fetch=not settings.dry_run) if pipelines is not None else []
    unknown = [name for name in request.reference if name not in settings.recipe.sources]
    if unknown:
        problems.append(f"preview.reference names {', '.join(unknown)}, which recipe '{settings.recipe.name}' has no source of: choose from {', '.join(settings.recipe.sources)}")
    return problems


def _device_problems(device: str) -> list[str]:
    """The job's device, where the launcher runs the jobs on this machine."""
    from ..execute import check_device  # the executor's own check (it imports torch)

    try:
        check_device(device)
    except UsageError as e:
        return [str(e)]
    return []


# --- the whole sweep -------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """The pre-flight of a whole sweep: every job's check, and the sweep's own problems and disk."""

    sweep_dir: Path
    jobs: list[JobCheck]
    at_once: int  # jobs the launcher runs at the same time
    problems: list[str] = field(default_factory=list)  # of the sweep as a whole
    need: int = 0
    free: int | None = None

    @property
    def failed(self) -> bool:
        return bool(self.problems) or any(j.problems for j in self.jobs)

    def message(self) -> str:
        """Every problem, once: a problem several jobs share is one line naming them."""
        by_text: dict[str, list[JobCheck]] = {}
        for job in self.jobs:
            for problem in job.problems:
                by_text.setdefault(problem, []).append(job)
        lines = [f"  {_jobs_label(jobs, len(self.jobs))}: {text}" for text, jobs in by_text.items()]
        lines += [f"  sweep: {text}" for text in self.problems]
        count = len(lines)
        return f"the sweep's pre-flight found {counted(count, 'problem')} ({counted(len(self.jobs), 'job')}); nothing was started:\n" + "\n".join(lines)

    def totals(self) -> str:
        planned = [j for j in self.jobs if j.job is not None]
        read = sum(j.job.plan.bytes_read for j in planned)
        written = sum(j.job.plan.bytes_written for j in planned if not j.in_memory)
        images = sum(len(j.previews.images()) for j in self.jobs if j.previews)
        dropped = sum(1 for j in planned if not j.keep_weights and not j.in_memory)
        in_memory = sum(1 for j in planned if j.in_memory)
        lines = [
            f"sweep: {counted(len(self.jobs), 'job')} into {self.sweep_dir}, {self.at_once} at a time; "
            f"reads {human_bytes(read)}, writes {human_bytes(written)}" + (f", renders {images} preview images" if images else ""),
        ]
        if dropped:
            lines.append(f"  keep_weights=false: {dropped} of the models are deleted after their previews")
        if in_memory:
            lines.append(f"  keep_weights=false: {in_memory} of the models are merged in memory for their previews, their weights never written")
        if self.free is not None:
            lines.append(f"  disk: needs {human_bytes(self.need)} at most in {self.sweep_dir}, {human_bytes(self.free)} free")
        return "\n".join(lines)


def _jobs_label(jobs: list[JobCheck], total: int) -> str:
    if total > 1 and len(jobs) == total:
        return f"every job ({total})"
    names = [f"{j.num} ({j.name})" for j in jobs[:SHOWN_JOBS]]
    more = f" and {len(jobs) - SHOWN_JOBS} more" if len(jobs) > SHOWN_JOBS else ""
    return ("jobs " if len(jobs) > 1 else "job ") + ", ".join(names) + more


def check_sweep(jobs: list[JobCheck], sweep_dir: Path, launcher: Launcher) -> SweepReport:
    """The sweep as a whole, once every job was checked: the launcher, a folder per job, the disk."""
    report = SweepReport(sweep_dir, jobs, max(1, min(launcher.at_once(len(jobs)), len(jobs))))
    report.problems += launcher.problems()
    _check_folders(report)
    _check_disk(report)
    return report


def _check_folders(report: SweepReport) -> None:
    seen: dict[Path, JobCheck] = {}
    for job in report.jobs:
        if job.folder is None:
            continue
        if job.folder in seen:
            report.problems.append(
                f"jobs {seen[job.folder].num} and {job.num} would both write to {job.name}: what differs between them makes the same "
                "folder name (a character a folder name cannot hold becomes _): tell them apart by another value"
            )
        seen.setdefault(job.folder, job)


def _check_disk(report: SweepReport) -> None:
    """The sweep's disk at its fullest: every model kept (of one merged in memory, its folder without weights),
    plus the largest ones that exist at once before their weights are deleted (keep_weights=false without
    previews), plus the previews."""
    kept = sum(j.model_bytes for j in report.jobs if j.keep_weights or j.in_memory)
    passing = sorted((j.model_bytes for j in report.jobs if not j.keep_weights and not j.in_memory), reverse=True)[: report.at_once]
    report.need = kept + sum(passing) + sum(j.previews.disk_bytes for j in report.jobs if j.previews)
    existing = report.sweep_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        report.problems.append(f"{existing}: cannot write here, so the sweep folder {report.sweep_dir} cannot be made: choose hydra.sweep.dir=FOLDER")
        return
    report.free = shutil.disk_usage(existing).free
    if report.need > report.free:
        models = [j.model_bytes for j in report.jobs if j.job is not None]
        hint = (
            "; keep_weights=false deletes each model after its previews, so the sweep needs only the models that exist at once"
            if all(j.keep_weights for j in report.jobs)
            else ""
        )
        report.problems.append(
            f"not enough free space in {existing}: the sweep needs {human_bytes(report.need)} "
            f"({len(models)} models of up to {human_bytes(max(models, default=0))}), {human_bytes(report.free)} are free{hint}"
        )
