"""The pre-flight as Hydra runs it: each job's config read into its settings (settings.py) and checked by
the sweep package's pre-flight (sweep/preflight.py), before anything is written.

A single run is checked before Hydra makes its run folder (callbacks.Preflight): a refused run writes nothing
at all, not even outputs/DATE/TIME/. A job then runs on the check made then (planned once), found by its
folder and config. The run's records go only where a user expects them: Hydra's run folder (its .hydra/ and
log) is made where it holds the model (no output= given), the previews, or where the user named it
(hydra.run.dir=); a run given output= alone writes its model there and nothing else, and logs to the terminal.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, open_dict, read_write

from ..errors import FluxRecipeError, UsageError
from ..sweep.preflight import JobCheck, Launcher, PipelineChecks, check_job
from ..sweep.scores import REFERENCE_DIR
from . import settings

_checked: dict[str, JobCheck] = {}  # job folder -> its pre-flight check, for the job when it runs in this process


def output_problem(output: object) -> str:
    return (
        f"output={output}: a multirun writes one model per job, each to <sweep dir>/<job>/transformer; "
        "choose where the sweep goes with hydra.sweep.dir=FOLDER instead"
    )


def check_config(cfg: DictConfig, check: JobCheck, launcher: Launcher | None, pipelines: PipelineChecks | None) -> JobCheck:
    """Every problem of the job `cfg` asks for, into `check.problems`: its settings, then the sweep package's
    checks of them. `launcher`: the sweep's, None for a single run."""
    check.task = settings.task_config(cfg)
    multirun = launcher is not None
    if multirun and cfg.get("output"):
        check.problems.append(output_problem(cfg.output))
    try:
        job = settings.read_job(cfg, multirun)
    except FluxRecipeError as e:
        check.problems.append(str(e))
        check.cause = e
        return check
    if check.folder is not None:  # the parents' reference previews: once per sweep, beside its jobs
        sweep_dir = settings.hydra_value(cfg, "sweep.dir")
        check.references = Path(os.path.abspath(str(sweep_dir))) / REFERENCE_DIR if multirun and sweep_dir else check.folder / REFERENCE_DIR
    return check_job(job, check, launcher, pipelines)


def checked_job(cfg: DictConfig, folder: Path, multirun: bool) -> JobCheck:
    """The check and plan of the job about to run in `folder`: the pre-flight's, where this process made it
    for this very config, else made now (a job that a launcher runs in another process, or a run started
    without Hydra's callbacks). Raises one UsageError listing the job's problems."""
    check = _checked.pop(str(folder), None)
    if check is None or check.task != settings.task_config(cfg):
        launcher = Launcher("") if multirun else None  # the sweep's pre-flight checked the launcher and pipelines
        check = check_config(cfg, JobCheck(0, "run", folder), launcher, None if multirun else PipelineChecks())
    refuse(check)
    return check


def refuse(check: JobCheck) -> None:
    """A job's problems, if it has any, as one error: the planner's own where that is the only one (its kind
    tells a recipe's fault from a source's), else one UsageError listing them."""
    if check.cause is not None and check.problems == [str(check.cause)]:
        raise check.cause
    if check.problems:
        raise UsageError("; ".join(check.problems)) from check.cause


def remember(checks: list[JobCheck]) -> None:
    """Checks of jobs that will run in this process (a single run, a sweep's basic launcher): planned once."""
    _checked.update((str(c.folder), c) for c in checks if c.folder is not None)


def wants_run_folder(config: DictConfig, check: JobCheck) -> bool:
    """Whether a single run needs Hydra's run folder: for the model (no output=), the previews, or anything at
    all where the user named the folder (hydra.run.dir=)."""
    named = any(str(o).lstrip("+").startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
    return named or check.previews is not None or not config.get("output")


def no_run_folder(config: DictConfig) -> None:
    """A run that writes only its output: Hydra makes no folder of its own (its run folder is the working
    folder, which exists; no .hydra/ in it, no log file) and logs to the terminal only."""
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.run.dir = os.getcwd()
        config.hydra.runtime.output_dir = os.getcwd()
        config.hydra.output_subdir = None
        logging = config.hydra.job_logging
        for name in [name for name, handler in logging.handlers.items() if "filename" in handler]:
            del logging.handlers[name]
        logging.root.handlers = [name for name in logging.root.handlers if name in logging.handlers]


def check_run_dir(run_dir: Path) -> None:
    """Hydra makes the run folder (its log, its .hydra/) before a job starts: say so if it cannot."""
    existing = Path(os.path.abspath(run_dir))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{existing}: cannot create the run folder {run_dir} here (not a writable folder): run elsewhere, or choose it with hydra.run.dir=FOLDER (or output=FOLDER for the model)")


def job_folder(cfg: DictConfig) -> Path:
    """The job's own folder (Hydra's run or sweep-job dir): the model goes there unless output= is given, and
    the previews; the working folder where Hydra made none (a config composed without a run)."""
    return Path(settings.hydra_value(cfg, "runtime.output_dir") or os.getcwd())
