"""A Hydra multirun (`-m`) of merges: the sweep's pre-flight before the launcher gets any job, each job run and
recorded in its folder, and the summary at the end.

Hydra's basic sweeper turns `-m` overrides into jobs and hands them to a launcher, which runs them here
(basic), in worker processes (joblib) or on other machines (submitit, SLURM); each job used to find its own
faults only once it ran, which on a cluster is after it was queued. fluxrecipe's sweeper
(hydra_plugins/fluxrecipe_sweeper.py) calls `before_launch` first: every job's config is composed as its
launcher will compose it, read into its settings and checked (sweep/preflight.py), and the sweep as a whole
is checked; every problem of every job is reported in one message, and then nothing is launched and no
folder is made. `dry_run=true` prints every job's plan and the totals instead of launching. Each job (and
its folder) is named by what differs between the jobs (`alpha=0.25`, sweep/labels.py), not by all its
overrides; its record keeps them all.

A job that fails is recorded in its folder (sweep/records.py) so that the other jobs go on; the process
exits non-zero at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from ..catalog import recipe_problem
from ..errors import FluxRecipeError
from ..plan import format_plan
from ..sweep.labels import folder_names
from ..sweep.preflight import EXIT_PROBLEMS, JobCheck, Launcher, PipelineChecks, SweepReport, check_sweep
from ..sweep.records import run_recorded
from ..sweep.summarize import Summary, report, summarize
from . import settings
from .job import run_config
from .preflight import check_config, remember

SUBDIR = "hydra.sweep.subdir"

_failed_here = 0  # jobs of this process's multirun that failed (the basic launcher runs them in-process)
_last_summary: Summary | None = None  # the summary the callback wrote at the end of this process's multirun
_summary_error: str | None = None  # why the callback could not write it


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launcher_of(node: DictConfig) -> Launcher:
    """The launcher (hydra.launcher) as the pre-flight needs it."""
    return Launcher(str(node.get("_target_", "")), node.get("n_jobs"), node.get("array_parallelism"))


# --- before the launcher (called by the sweeper, hydra_plugins/fluxrecipe_sweeper.py) ----------------------


def before_launch(master: DictConfig, loader: Any, all_jobs: list[list[str]]) -> list[list[str]] | None:
    """Check every job of the sweep. Exits (status 1) with one message when a check failed; for a dry run
    prints every plan and the totals and returns None (launch nothing); else returns the jobs to launch,
    each with its folder named by what differs between the jobs."""
    jobs = named_jobs(all_jobs)
    sweep = _preflight(master, loader, jobs)
    if sweep is None:
        return None
    if launcher_of(master.hydra.launcher).in_process:  # each job runs here, on the plan its check made
        remember(sweep.jobs)
    return jobs


def before_search(master: DictConfig, loader: Any, space: dict[str, Any], fixed: dict[str, Any], trials: int) -> str | list[str] | None:
    """A search's pre-flight (hydra/sweeper=optuna, hydra_plugins/fluxrecipe_sweeper.py): the search space, and
    one job composed from it (each searched parameter at the low end of its range, or its first choice) and
    checked as a grid's jobs are; exits (status 1) with one message, as before_launch. Returns Optuna's
    directions (None for a dry run: nothing launched)."""
    problems = []
    if all(len(getattr(d, "choices", (None, None))) < 2 for d in space.values()):  # `recipe.alpha=0.5` is a choice of one
        problems.append("hydra/sweeper=optuna: nothing to search: give a parameter a range, e.g. 'recipe.alpha=interval(0,1)' or 'recipe.alpha.double_blocks.3=interval(0,1)'")
    sample = {name: getattr(d, "choices", (getattr(d, "low", None),))[0] for name, d in space.items()}
    job = [f"{name}={value}" for name, value in {**sample, **fixed}.items()]
    objective = OmegaConf.select(master, "search.objective", default=None)
    if objective is None:
        problems.append("hydra/sweeper=optuna maximises search.objective: set it, e.g. search.objective=clip with preview=true preview.score=[clip]")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        problems.append(f"hydra.sweeper.n_trials={trials}: a whole number of trials from 1")
    if _preflight(master, loader, [job], problems, f"the search's first trial ({trials} in all)") is None:
        return None
    pareto = isinstance(objective, ListConfig)
    return ["maximize"] * len(objective) if pareto else "maximize"


def _preflight(master: DictConfig, loader: Any, jobs: list[list[str]], problems: Sequence[str] = (), dry_run_note: str | None = None) -> SweepReport | None:
    """Every job checked (and the sweep's own `problems`); exits with one message if any; for a dry run
    prints every plan and returns None."""
    sweep_dir = Path(str(master.hydra.sweep.dir))
    dry_run = master.get("dry_run") is True  # any other value than true or false: every job says so
    launcher = launcher_of(master.hydra.launcher)
    try:
        checks = list(_checks(_job_configs(master, loader, jobs), sweep_dir, launcher))
    finally:
        HydraConfig.instance().set_config(master)
    sweep = check_sweep(checks, sweep_dir, launcher)
    sweep.problems[:0] = problems
    if dry_run:
        for check in sweep.jobs:
            if check.job is not None:
                print(f"== job {check.num}: {dry_run_note or check.name}\n{format_plan(check.job.plan)}")
                if check.previews is not None:
                    print(f"previews: {check.previews.describe()}")
    if dry_run or not sweep.failed:
        print(sweep.totals(), flush=True)
    if sweep.failed:
        print(f"fluxrecipe: error: {sweep.message()}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PROBLEMS)
    if dry_run:
        print("dry run: nothing was launched and nothing written")
        return None
    return sweep


def named_jobs(all_jobs: list[list[str]]) -> list[list[str]]:
    """Every job with its folder named by what differs between the jobs (`alpha=0.25`): Hydra would name it
    by all its overrides, most of them the same in every job (a source's path, the recipe, the previews'
    settings). The folder name is quoted for Hydra (it holds no quote, backslash or $: labels.UNSAFE)."""
    return [[*overrides, f"{SUBDIR}='{name}'"] for overrides, name in zip(all_jobs, folder_names(all_jobs))]


def _checks(configs: Iterable[tuple[int, Sequence[str], DictConfig | None, str | None]], sweep_dir: Path, launcher: Launcher) -> Iterable[JobCheck]:
    pipelines = PipelineChecks()
    for num, overrides, cfg, error in configs:
        if cfg is None:
            yield JobCheck(num, " ".join(overrides), None, problems=[str(error)])
            continue
        folder = Path(cfg.hydra.runtime.output_dir)
        name = os.path.relpath(folder, sweep_dir.absolute())
        yield check_config(cfg, JobCheck(num, name, folder), launcher, pipelines)


def _recipe_problem(overrides: Sequence[str]) -> str | None:
    """Why the recipe a job chooses is none (a mistyped name, a missing file), as a single run says it."""
    parser = OverridesParser.create()
    for override in parser.parse_overrides([o for o in overrides if o.startswith("recipe=")]):
        return recipe_problem(str(override.value()))
    return None


def _job_configs(master: DictConfig, loader: Any, all_jobs: list[list[str]]) -> Iterable[tuple[int, Sequence[str], DictConfig | None, str | None]]:
    """Each job's config as its launcher will compose it (Hydra's load_sweep_config), with its number and folder
    set as Hydra's run_job sets them, and made Hydra's current config, so that the job's checks see the job."""
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


# --- one job of a multirun -----------------------------------------------------------------------------


def run_job(cfg: DictConfig, job: Callable[[DictConfig], Any] | None = None) -> dict[str, Any]:
    """One job of a multirun, recorded in its folder (sweep/records.py); a failure is counted, not raised.
    `job`: what the job does; by default the merge the command line asks for (job.py)."""
    global _failed_here
    hydra = HydraConfig.get()
    task = job or (lambda cfg: run_config(cfg, multirun=True))
    record = run_recorded(Path(hydra.runtime.output_dir), list(hydra.overrides.task), lambda: task(cfg), settings.show_traceback(cfg))
    if record["status"] == "failed":
        _failed_here += 1
    if OmegaConf.select(cfg, "search.objective", default=None) is not None:  # a search's sweeper reads the job's objective
        return record.get("objective", _failed_objective(cfg))
    return record


def _failed_objective(cfg: DictConfig) -> Any:
    """A failed trial's objective: the worst (scores.Objective.failed)."""
    try:
        return settings.objective_of(OmegaConf.select(cfg, "search.objective")).failed
    except FluxRecipeError:
        return float("-inf")


def failed() -> int:
    """Failed (or unfinished) jobs of the multirun this process ran: from its summary, else as counted here."""
    if _last_summary is not None:
        return len(_last_summary.failed)
    return _failed_here + (1 if _summary_error else 0)


def summarize_at_end(sweep_dir: Path) -> None:
    """The end of a multirun: its summary written into the sweep folder and reported (a failure to write it
    is said, and fails the process at the end: Hydra would only warn)."""
    global _last_summary, _summary_error
    if not sweep_dir.is_dir():
        return
    try:
        _last_summary = summarize(sweep_dir)
    except Exception as e:  # noqa: BLE001 - whatever it is, the jobs are done: say it, and fail the process at the end
        _summary_error = f"{type(e).__name__}: {e}"
        print(f"fluxrecipe: error: the sweep's summary could not be written ({_summary_error}); "
              f"once fixed: python -m fluxrecipe summary {sweep_dir}", file=sys.stderr, flush=True)
        return
    print(report(_last_summary), file=sys.stderr if _last_summary.failed else sys.stdout, flush=True)
