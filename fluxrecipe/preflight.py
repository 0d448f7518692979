"""A sweep's pre-flight: every job checked in the launching process, before any job starts or is submitted.

Hydra's basic sweeper turns `-m` overrides into jobs and hands them to a launcher, which runs them here
(basic), in worker processes (joblib) or on other machines (submitit, SLURM); each job used to find its own
faults only once it ran, which on a cluster is after it was queued. The sweeper of conf/config.yaml
(hydra_plugins/fluxrecipe_sweeper.py) calls `before_launch` first, which composes every job's config as its
launcher will, and plans it with
`run.plan_job` (no tensor is read), checks its previews, and checks what the sweep needs as a whole: a folder
per job, and the disk of every model it keeps (with `keep_weights=false`, only of those that exist at once)
against the free space of the sweep folder. Every problem of every job is reported in one message, and then
nothing is launched and no folder is made. `dry_run=true` prints every job's plan and the totals instead of
launching. Whatever the launcher, it only ever sees a sweep that passed.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from . import preview
from .catalog import recipe_problem
from .errors import FluxRecipeError, UsageError
from .plan import format_plan, human_bytes
from .text import counted

EXIT_PROBLEMS = 1
SIDE_FILES = 4 << 20  # config, card, recipe, provenance, diagnostics, manifest, shard headers: a bound
SHOWN_JOBS = 4  # job names listed for a problem several jobs share

_checked: dict[str, "JobCheck"] = {}  # job folder -> its pre-flight check, for the job when it runs in this process


@dataclass
class JobCheck:
    """One job (of a sweep, or a single run) as checked and planned before it runs."""

    num: int
    name: str  # its folder relative to the sweep folder, or its overrides where it could not be composed
    folder: Path | None
    job: Any = None  # run.JobPlan, when the job could be planned
    previews: preview.PreviewSettings | None = None
    keep_weights: bool = True
    problems: list[str] = field(default_factory=list)
    task: dict | None = None  # the job's config as its task gets it (without `hydra`): which job this check is for
    cause: FluxRecipeError | None = None  # the planner's error, for traceback=true

    @property
    def model_bytes(self) -> int:
        return self.job.plan.bytes_written + SIDE_FILES if self.job is not None else 0


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
        written = sum(j.job.plan.bytes_written for j in planned)
        images = sum(len(j.previews.images()) for j in self.jobs if j.previews)
        dropped = sum(1 for j in planned if not j.keep_weights)
        lines = [
            f"sweep: {counted(len(self.jobs), 'job')} into {self.sweep_dir}, {self.at_once} at a time; "
            f"reads {human_bytes(read)}, writes {human_bytes(written)}" + (f", renders {images} preview images" if images else ""),
        ]
        if dropped:
            lines.append(f"  keep_weights=false: {dropped} of the models are deleted after their previews")
        if self.free is not None:
            lines.append(f"  disk: needs {human_bytes(self.need)} at most in {self.sweep_dir}, {human_bytes(self.free)} free")
        return "\n".join(lines)


def _jobs_label(jobs: list[JobCheck], total: int) -> str:
    if total > 1 and len(jobs) == total:
        return f"every job ({total})"
    names = [f"{j.num} ({j.name})" for j in jobs[:SHOWN_JOBS]]
    more = f" and {len(jobs) - SHOWN_JOBS} more" if len(jobs) > SHOWN_JOBS else ""
    return ("jobs " if len(jobs) > 1 else "job ") + ", ".join(names) + more


# --- checking one job -------------------------------------------------------------------------------------


class _PipelineChecks:
    """preview.check once per pipeline and model shape: every job of a sweep usually shares them."""

    def __init__(self) -> None:
        self.done: dict[tuple, list[str]] = {}

    def __call__(self, settings: preview.PreviewSettings, config: dict[str, Any], fetch: bool) -> list[str]:
        key = (settings.pipeline, fetch, *(config.get(k) for k in ("joint_attention_dim", "pooled_projection_dim", "in_channels")))
        if key not in self.done:
            self.done[key] = preview.check(settings, config, fetch)
        return self.done[key]


def check_job(cfg: DictConfig, check: JobCheck, dry_run: bool, multirun: bool, pipelines: _PipelineChecks | None) -> JobCheck:
    """Every problem of one job that can be found without reading a tensor, into `check.problems`.
    `pipelines`: None leaves the preview pipeline unchecked (a sweep's pre-flight checked it for every job)."""
    from .job import keep_weights
    from .run import plan_job
    from .sweep import output_problem

    check.task = task_config(cfg)
    problems = check.problems
    if multirun and cfg.get("output"):
        problems.append(output_problem(cfg.output))
    wants_previews = False
    try:
        check.keep_weights = keep_weights(cfg)
        wants_previews = preview.enabled(cfg)
    except UsageError as e:
        problems.append(str(e))
    try:
        check.job = plan_job(cfg, dry_run=dry_run or (multirun and bool(cfg.get("output"))))
    except FluxRecipeError as e:
        problems.append(str(e))
        check.cause = e
    if check.job is not None and check.job.plan.single_file and (wants_previews or not check.keep_weights):
        problems.append(
            f"format={check.job.plan.format} writes one file; "
            + ("previews load the merged model as a diffusers folder" if wants_previews else "keep_weights=false keeps the folder's recipe.yaml, which one file has no room for")
            + f": {'sweep' if multirun else 'merge'} with format=diffusers (the default), then convert the merge you choose (its recipe.yaml, with format=...)"
        )
    elif not multirun and not check.keep_weights and not wants_previews:
        problems.append("keep_weights=false deletes a merge's weights once its previews are done: without preview=true it would delete the merge as soon as it is written")
    elif wants_previews and check.job is not None:
        config = check.job.plan.config
        try:
            check.previews = preview.settings_of(cfg, bool(config.get("guidance_embeds")))
        except UsageError as e:
            problems.append(str(e))
        if check.previews is not None and pipelines is not None:
            problems += pipelines(check.previews, config, fetch=not dry_run)
        if check.previews is not None and (check.folder / preview.PREVIEW_DIR).exists():
            problems.append(f"{check.folder / preview.PREVIEW_DIR} already exists (an earlier run in this folder): choose another " + ("hydra.sweep.dir" if multirun else "hydra.run.dir"))
    if multirun and str(cfg.device) != "cpu":
        problems += _device_problems(str(cfg.device), cfg.hydra.launcher)
    return check


def check_run(config: DictConfig) -> JobCheck:
    """A single run's pre-flight (run.Preflight, before Hydra makes the run folder): the checks of a sweep's
    job, its preview pipeline included, as one UsageError. The job then runs on this check's plan."""
    from .run import dry_run_of

    folder = Path(str(config.hydra.runtime.output_dir))
    check = check_job(config, JobCheck(0, "run", folder), dry_run_of(config), multirun=False, pipelines=_PipelineChecks())
    if check.problems:
        raise UsageError("; ".join(check.problems)) from check.cause
    _checked[str(folder)] = check
    return check


def checked_job(cfg: DictConfig, folder: Path) -> JobCheck:
    """The check and plan of the job about to run in `folder`: the pre-flight's, where this process made it
    for this very config, else made now (a job that a launcher runs in another process, or a run started
    without Hydra's callbacks). Raises one UsageError listing the job's problems."""
    from .run import dry_run_of
    from .sweep import in_multirun

    check = _checked.pop(str(folder), None)
    if check is None or check.task != task_config(cfg):
        multirun = in_multirun()
        check = check_job(cfg, JobCheck(0, "run", folder), dry_run_of(cfg), multirun, pipelines=None if multirun else _PipelineChecks())
    if check.problems:
        raise UsageError("; ".join(check.problems))
    return check


def task_config(cfg: DictConfig) -> dict:
    """A job's config as plain data, without Hydra's own part: what tells a job's task from another's."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return data


def _device_problems(device: str, launcher: DictConfig) -> list[str]:
    """The job's device, where the launcher runs the jobs on this machine (a SLURM sweep is launched from a
    login node that may have no GPU)."""
    if "slurm" in str(launcher.get("_target_", "")).lower():
        return []
    from .execute import check_device  # the executor's own check (it imports torch)

    try:
        check_device(device)
    except UsageError as e:
        return [str(e)]
    return []


# --- the whole sweep -------------------------------------------------------------------------------------


def preflight(configs: Iterable[tuple[int, Sequence[str], DictConfig | None, str | None]], sweep_dir: Path, launcher: DictConfig, dry_run: bool) -> SweepReport:
    """Check every job (num, overrides, composed config or None, composition error) and the sweep as a whole."""
    pipelines = _PipelineChecks()
    jobs: list[JobCheck] = []
    for num, overrides, cfg, error in configs:
        if cfg is None:
            jobs.append(JobCheck(num, " ".join(overrides), None, problems=[str(error)]))
            continue
        folder = Path(cfg.hydra.runtime.output_dir)
        name = os.path.relpath(folder, sweep_dir.absolute())
        jobs.append(check_job(cfg, JobCheck(num, name, folder), dry_run, multirun=True, pipelines=pipelines))
    report = SweepReport(sweep_dir, jobs, max(1, min(jobs_at_once(launcher, len(jobs)), len(jobs))))
    report.problems += _launcher_problems(launcher)
    _check_folders(report)
    _check_disk(report)
    return report


def _launcher_problems(launcher: DictConfig) -> list[str]:
    """A launcher that cannot start here fails only once the sweep folder exists (submitit looks for SLURM's
    `srun` as it starts): say it before."""
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher") and shutil.which("srun") is None:
        return ["hydra/launcher=slurm: this machine has no SLURM (no `srun` on the PATH): launch the sweep from a node of the cluster, "
                "or run it here with hydra/launcher=basic (the default), joblib or submitit_local"]
    return []


def _in_process(launcher: DictConfig) -> bool:
    """The launcher runs every job in this process (Hydra's basic launcher), one after the other."""
    return str(launcher.get("_target_", "")).endswith("BasicLauncher")


def _check_folders(report: SweepReport) -> None:
    seen: dict[Path, JobCheck] = {}
    for job in report.jobs:
        if job.folder is None:
            continue
        if job.folder in seen:
            report.problems.append(f"jobs {seen[job.folder].num} and {job.num} would both write to {job.name}: an option that tells them apart is left out of the folder names (hydra.job.config.override_dirname.exclude_keys)")
        seen.setdefault(job.folder, job)


def _check_disk(report: SweepReport) -> None:
    """The sweep's disk at its fullest: every model kept, plus the largest ones that exist at once before their
    previews are done and their weights deleted (keep_weights=false), plus the previews."""
    kept = sum(j.model_bytes for j in report.jobs if j.keep_weights)
    passing = sorted((j.model_bytes for j in report.jobs if not j.keep_weights), reverse=True)[: report.at_once]
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


def jobs_at_once(launcher: DictConfig, jobs: int) -> int:
    """How many jobs the launcher runs at the same time (each holds a model until it is done)."""
    if _in_process(launcher):
        return 1
    n_jobs = launcher.get("n_jobs")  # joblib: -1 one per core, -2 all but one, ...
    if isinstance(n_jobs, int) and n_jobs != 0:
        return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    parallelism = launcher.get("array_parallelism")  # submitit's SLURM array
    return parallelism if isinstance(parallelism, int) and parallelism > 0 else jobs


# --- before the launcher (called by the sweeper, hydra_plugins/fluxrecipe_sweeper.py) ----------------------


def before_launch(master: DictConfig, loader: Any, all_jobs: list[list[str]]) -> list[str] | None:
    """Check every job of the sweep. Exits (status 1) with one message when a check failed; for a dry run
    prints every plan and the totals and returns None (launch nothing); else returns the overrides to add to
    every job (see quiet_folder_names)."""
    sweep_dir = Path(str(master.hydra.sweep.dir))
    dry_run = master.get("dry_run") is True  # any other value than true or false: every job says so
    extra = quiet_folder_names(master, all_jobs)
    try:
        jobs = [[*overrides, *extra] for overrides in all_jobs]
        report = preflight(_job_configs(master, loader, jobs), sweep_dir, master.hydra.launcher, dry_run)
    finally:
        HydraConfig.instance().set_config(master)
    if dry_run:
        for job in report.jobs:
            if job.job is not None:
                print(f"== job {job.num}: {job.name}\n{format_plan(job.job.plan)}")
                if job.previews is not None:
                    print(f"previews: {job.previews.describe()}")
    if dry_run or not report.failed:
        print(report.totals(), flush=True)
    if report.failed:
        print(f"fluxrecipe: error: {report.message()}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PROBLEMS)
    if dry_run:
        print("dry run: nothing was launched and nothing written")
        return None
    if _in_process(master.hydra.launcher):  # each job runs here, on the plan its check made
        _checked.update((str(job.folder), job) for job in report.jobs)
    return extra


def quiet_folder_names(master: DictConfig, all_jobs: list[list[str]]) -> list[str]:
    """A job's folder is named by its overrides; preview settings that are the same in every job (the
    pipeline, the prompts, the size) tell no job apart and would only make every name long: a Hydra override
    that leaves them out of the names (a swept preview setting stays in)."""
    parser = OverridesParser.create()
    jobs = [{o.key_or_group: o.get_value_element_as_str() for o in parser.parse_overrides(list(overrides))} for overrides in all_jobs]
    constant = [key for key in (jobs[0] if jobs else {}) if key.startswith("preview.") and all(job.get(key) == jobs[0][key] for job in jobs)]
    if not constant:
        return []
    excluded = list(master.hydra.job.config.override_dirname.exclude_keys)
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(dict.fromkeys([*excluded, *constant]))}]"]


def _recipe_problem(overrides: Sequence[str]) -> str | None:
    """Why the recipe a job chooses is none (a mistyped name, a missing file), as a single run says it."""
    parser = OverridesParser.create()
    for override in parser.parse_overrides([o for o in overrides if o.startswith("recipe=")]):
        return recipe_problem(str(override.value()))
    return None


def _job_configs(master: DictConfig, loader: Any, all_jobs: list[list[str]]) -> Iterable[tuple[int, Sequence[str], DictConfig | None, str | None]]:
    """Each job's config as its launcher will compose it (Hydra's load_sweep_config), with its number and folder
    set as Hydra's run_job sets them, and made Hydra's current config, so that run.plan_job sees the job."""
    for num, overrides in enumerate(all_jobs):
        try:
            cfg = loader.load_sweep_config(master, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = num
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)
            with read_write(cfg.hydra.runtime):
                cfg.hydra.runtime.output_dir = os.path.abspath(os.path.join(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)))
            HydraConfig.instance().set_config(cfg)
        except (HydraException, OmegaConfBaseException) as e:
            task = [o for o in overrides if not o.startswith("hydra.")]
            yield num, task, None, _recipe_problem(overrides) or " ".join(str(e).split("Config search path:")[0].split())
            continue
        yield num, overrides, cfg, None
