"""Job records: what each job of a sweep leaves in its folder, and reading a sweep folder back from them.

Each job of a multirun runs in its own folder `<sweep dir>/<job>/` (named by what differs between the jobs,
labels.py) and writes its model to `<job>/transformer`. A job that fails is caught here, logged as one message
and recorded, so that the other jobs go on and Hydra still calls the callbacks at the end. Every job leaves
`<job>/fluxrecipe-job.json` (status, error, wall time, bytes written, output, its full overrides), and its
model folder holds `diagnostics.json`. The summary is built from those files alone: jobs may have run in
other processes or on other machines (joblib, submitit, SLURM).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import FluxRecipeError
from ..files import read_small
from ..writer import replace_json
from .labels import split_override
from .previews import PREVIEW_DIR, read_previews
from .scores import read_scores

log = logging.getLogger("fluxrecipe")

JOB_STATUS_NAME = "fluxrecipe-job.json"
MULTIRUN_YAML = "multirun.yaml"
MAX_STATE_FILE = 1 << 20  # a job record or Hydra's overrides.yaml / hydra.yaml is a few KB
OK, FAILED, DRY_RUN, UNFINISHED = "ok", "failed", "dry_run", "unfinished"
TIME_LIMIT = ("stopped at its time limit (hydra.launcher.timeout_min, with SLURM's warning hydra.launcher.signal_delay_s "
              "seconds before): give the jobs more time")


# --- one job of a multirun -----------------------------------------------------------------------------


def run_recorded(job_dir: Path, overrides: list[str], job: Callable[[], Any], show_traceback: bool) -> dict[str, Any]:
    """Run one job of a multirun; never raise for a failed job: log it as one message and record it.

    Hydra's sweeper re-raises a job's exception after the batch and then skips the end-of-sweep callbacks,
    so a failure must stay inside the job; the command line counts it for its exit status. Returns the job's
    record (plain data: a launcher may carry it back from another process or machine).
    """
    status: dict[str, Any] = {"status": OK, "error": None, "overrides": list(overrides)}
    started = time.monotonic()
    value = None
    try:
        value = job()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a SLURM time limit): the sweep stops; say where it stopped
        status.update(status=FAILED, error="interrupted (Ctrl-C or SIGTERM, e.g. a time limit)", seconds=round(time.monotonic() - started, 3))
        replace_json(job_dir / JOB_STATUS_NAME, status)
        raise
    except Exception as e:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the sweep
        user_error = isinstance(e, FluxRecipeError)
        message = str(e) if user_error else f"{type(e).__name__}: {e}"
        if _near_time_limit(e):  # not a bug either: say what to change
            user_error, message = True, TIME_LIMIT
        status.update(status=FAILED, error=message)
        log.error(f"fluxrecipe: error in job {job_dir.name}: {message}")
        if show_traceback or not user_error:  # an exception that is not a FluxRecipeError is a bug: show where
            log.error("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    status["seconds"] = round(time.monotonic() - started, 3)
    if value is not None:  # a failed job imports nothing more: a signal that struck during an import broke it
        from ..execute import Result  # here, not at the top: `summary` has no use for torch

        if isinstance(value, Result):  # a dry run returns the Plan
            output = os.path.relpath(value.output, job_dir)  # no absolute local path in a file of the sweep
            status.update(output=output, bytes_read=value.bytes_read, bytes_written=value.bytes_written)
        else:
            status["status"] = DRY_RUN
    status.update(read_scores(job_dir) or {})  # the job's scores (scores.py), where it was asked for them
    replace_json(job_dir / JOB_STATUS_NAME, status)
    return status


def _near_time_limit(error: BaseException | None) -> bool:
    """submitit's answer, raised inside a SLURM job, to the signal SLURM sends signal_delay_s before the job's
    time limit (a merge is not resubmitted: max_num_timeout 0); also where it struck inside a library that
    wrapped it (diffusers' lazy imports raise a RuntimeError from it)."""
    utils = sys.modules.get("submitit.core.utils")  # loaded in a submitit job only
    seen = set()
    while utils is not None and error is not None and id(error) not in seen:
        if isinstance(error, utils.UncompletedJobError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


# --- reading a sweep folder ----------------------------------------------------------------------------


@dataclass
class Job:
    folder: Path
    name: str  # the folder, relative to the sweep dir
    num: int
    overrides: list[str]
    status: str
    error: str | None = None
    output: Path | None = None
    seconds: float | None = None
    bytes_written: int | None = None
    overall: dict[str, float | None] = field(default_factory=dict)  # source -> relative distance, whole model
    blocks: dict[str, dict[str, float | None]] = field(default_factory=dict)  # block -> source -> distance
    previews: list[dict[str, Any]] = field(default_factory=list)  # {prompt, seed, file}, from previews/previews.json
    preview_settings: dict[str, Any] = field(default_factory=dict)
    preview_error: str | None = None  # previews.json is there but cannot be read
    scores: dict[str, float] = field(default_factory=dict)  # score -> the mean over the job's images (preview.score)
    image_scores: list[dict[str, Any]] = field(default_factory=list)  # {prompt (index), seed, score: value, ...}
    objective: float | list[float] | None = None  # search.objective's value (a list: a Pareto front's objectives)
    parents: dict[str, int] | None = None  # {better, of}: images better than every unmerged parent (preview.reference)

    def override_map(self) -> dict[str, str]:
        return dict(split_override(o) for o in self.overrides)

    @property
    def weights(self) -> str:
        """Whether the model folder still holds its weights ('deleted': keep_weights=false, or by hand)."""
        if self.output is None or not self.output.is_dir():
            return ""
        return "kept" if any(self.output.glob("*.safetensors")) else "deleted"


class DamagedFile(ValueError):
    """A sweep state file that cannot be what a job wrote: the job's row says which and why."""


def is_sweep(folder: Path) -> bool:
    """A multirun's folder: Hydra writes multirun.yaml into it before any job starts."""
    return (folder / MULTIRUN_YAML).is_file()


def read_jobs(sweep_dir: Path) -> list[Job]:
    """Every job folder under the sweep dir (a folder holding Hydra's .hydra/overrides.yaml), in job order."""
    jobs = [_read_job(sweep_dir, p.parent.parent) for p in sorted(sweep_dir.rglob(".hydra/overrides.yaml"))]
    return sorted(jobs, key=lambda j: (j.num, j.name))


def _read_job(sweep_dir: Path, folder: Path) -> Job:
    name = folder.relative_to(sweep_dir).as_posix()
    try:
        overrides = _load(folder / ".hydra" / "overrides.yaml", yaml.safe_load)
        if overrides is None:
            overrides = []
        if not isinstance(overrides, list) or not all(isinstance(o, (str, int, float, bool)) for o in overrides):
            raise DamagedFile(f"{name}/.hydra/overrides.yaml is not a list of overrides")
    except DamagedFile as e:
        return Job(folder=folder, name=name, num=sys.maxsize, overrides=[], status=FAILED, error=str(e))
    shown = [_without_local_prefix(str(o), sweep_dir) for o in overrides]
    job = Job(folder=folder, name=name, num=_job_num(folder), overrides=shown, status=UNFINISHED)
    status_file = folder / JOB_STATUS_NAME
    if not status_file.exists():
        job.error = f"no {JOB_STATUS_NAME}: the job did not finish (killed, timed out or still running); see {job.name}/fluxrecipe.log, or .submitit/ for submitit and SLURM jobs"
        return job
    try:
        status = _record(_load(status_file, json.loads), f"{name}/{JOB_STATUS_NAME}")
    except DamagedFile as e:
        job.status, job.error = FAILED, str(e)
        return job
    job.status, job.error, job.seconds, job.bytes_written = status["status"], status["error"], status["seconds"], status["bytes_written"]
    job.scores, job.image_scores, job.objective, job.parents = status["scores"] or {}, status["image_scores"] or [], status["objective"], status["parents"]
    if status["output"]:
        job.output = folder / status["output"]  # relative to the job folder (an absolute one: as a job wrote it before)
        if not job.output.exists() and (folder / job.output.name).exists():  # the sweep folder was moved or copied
            job.output = folder / job.output.name
        job.overall, job.blocks = _diagnostics(job.output / "diagnostics.json")
    try:
        job.preview_settings, job.previews = read_previews(folder / PREVIEW_DIR)
    except (OSError, ValueError) as e:
        job.preview_error = f"{name}/{PREVIEW_DIR}/previews.json cannot be read: {e}"
    return job


def sweep_relative(file: Path | None, sweep_dir: Path) -> str | None:
    """A file as a sweep's own files name it: relative to the sweep folder where it lies inside it."""
    if file is None:
        return None
    return file.relative_to(sweep_dir).as_posix() if file.is_relative_to(sweep_dir) else str(file)


def _without_local_prefix(override: str, sweep_dir: Path) -> str:
    """An override as the summary shows it: a local absolute path in its value (`recipe.sources.krea=/data/k`)
    relative to the sweep folder, as every file of an output names local paths."""
    key, sep, value = override.partition("=")
    m = re.fullmatch(r"(['\"]?)([/~].*?)\1", value, re.S)
    if not sep or not m:
        return override
    return f"{key}={m[1]}{os.path.relpath(os.path.expanduser(m[2]), sweep_dir)}{m[1]}"


def _load(path: Path, parse: Callable[[str], Any]) -> Any:
    """A small state file, parsed; DamagedFile for anything else (a folder, a FIFO, a huge or broken file)."""
    try:
        return parse(read_small(path, MAX_STATE_FILE).decode())
    except DamagedFile:
        raise
    except OSError as e:
        raise DamagedFile(f"{path} cannot be read: {e.strerror or e}") from None
    except (ValueError, yaml.YAMLError) as e:
        raise DamagedFile(f"{path} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _record(value: Any, where: str) -> dict[str, Any]:
    """A job record with the types a job writes, or DamagedFile."""
    if not isinstance(value, dict):
        raise DamagedFile(f"{where} is not a job record (a JSON object)")
    kinds = {"status": (str,), "error": (str, type(None)), "seconds": (int, float, type(None)), "bytes_written": (int, type(None)), "output": (str, type(None))}
    record = {key: value.get(key) for key in kinds}
    record["status"] = record["status"] or FAILED
    for key, types in kinds.items():
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            raise DamagedFile(f"{where}: {key} is {json.dumps(record[key])[:80]}, which a job never writes")
    record.update(_scores_of(value, where))
    if record["status"] not in (OK, FAILED, DRY_RUN):
        raise DamagedFile(f"{where}: status {record['status']!r} is none of {OK}, {FAILED}, {DRY_RUN}")
    return record


def _scores_of(value: dict, where: str) -> dict[str, Any]:
    """A record's scores (scores.py), with the types a job writes, or DamagedFile."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = {key: value.get(key) for key in ("scores", "image_scores", "objective", "parents")}
    scores, images, objective, parents = out.values()
    good = (
        (scores is None or (isinstance(scores, dict) and all(isinstance(k, str) and number(v) for k, v in scores.items())))
        and (images is None or (isinstance(images, list) and all(isinstance(i, dict) and all(number(v) for v in i.values()) for i in images)))
        and (objective is None or number(objective) or (isinstance(objective, list) and all(map(number, objective))))
        and (parents is None or (isinstance(parents, dict) and set(parents) == {"better", "of"} and all(isinstance(v, int) for v in parents.values())))
    )
    if not good:
        raise DamagedFile(f"{where}: its scores are not what a job writes")
    return out


def _diagnostics(path: Path) -> tuple[dict, dict]:
    """A merge's distances (whole model, per block), or none where diagnostics are off or the file is damaged."""
    try:
        d = _load(path, json.loads) if path.exists() else {}
    except DamagedFile:
        return {}, {}
    number = (int, float, type(None))
    overall, blocks = (d.get("overall"), d.get("blocks")) if isinstance(d, dict) else (None, None)
    if not isinstance(overall, dict) or not all(isinstance(v, number) for v in overall.values()):
        return {}, {}
    if not isinstance(blocks, dict) or not all(isinstance(b, dict) and all(isinstance(v, number) for v in b.values()) for b in blocks.values()):
        return overall, {}
    return overall, blocks


def _job_num(folder: Path) -> int:
    try:
        num = _load(folder / ".hydra" / "hydra.yaml", yaml.safe_load)["hydra"]["job"]["num"]
    except (DamagedFile, TypeError, KeyError):  # a missing or odd hydra.yaml only loses the order
        return sys.maxsize
    return num if isinstance(num, int) and not isinstance(num, bool) else sys.maxsize
