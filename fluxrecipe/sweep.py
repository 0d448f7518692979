"""Sweeps: a Hydra multirun of merges, each job recorded on disk, and a summary of the whole sweep.

Each job of a multirun runs in its own folder `<sweep dir>/<job>/` (named by its overrides, made safe as a
folder name by the `fluxrecipe.job_dirname` resolver) and writes its model to `<job>/transformer`. A job
that fails is caught here, logged as one message and recorded, so that the other jobs go on and Hydra still
calls the callbacks at the end. Every job leaves `<job>/fluxrecipe-job.json` (status, error, wall time,
bytes written, output), and its model folder holds `diagnostics.json`.

The summary is built from those files alone (jobs may have run in other processes or on other machines:
joblib, submitit, SLURM): `summary.csv` and `summary.md` (one row per job), `summary_blocks.csv` (per job,
block and source, the relative distance of the merge to the source) and `summary.png` (that distance,
block by block, one line per job, one panel per source). `SweepSummary` writes it at the end of a multirun;
`python -m fluxrecipe summary SWEEP_DIR` writes it again from an existing sweep folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .diagnostics import block_order
from .errors import FluxRecipeError, UsageError
from .files import read_small
from .text import counted
from .writer import replace_json

log = logging.getLogger("fluxrecipe")

JOB_STATUS_NAME = "fluxrecipe-job.json"
SUMMARY_CSV, SUMMARY_MD, BLOCKS_CSV, SUMMARY_PNG = "summary.csv", "summary.md", "summary_blocks.csv", "summary.png"
MULTIRUN_YAML = "multirun.yaml"
MAX_STATE_FILE = 1 << 20  # a job record or Hydra's overrides.yaml / hydra.yaml is a few KB
OK, FAILED, DRY_RUN, UNFINISHED = "ok", "failed", "dry_run", "unfinished"
EXIT_FAILED, EXIT_USAGE = 1, 2

# Characters kept in a job folder's name; any other (a '/' of a path, a space, a quote) becomes '_'.
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@%~\[\]-]")
MAX_NAME = 160  # well under the 255 bytes a file name may have, leaving room for a hash

_failed_here = 0  # jobs of this process's multirun that failed (the basic launcher runs them in-process)
_last_summary: Summary | None = None  # the summary the callback wrote at the end of this process's multirun
_summary_error: str | None = None  # why the callback could not write it


# --- job folders -------------------------------------------------------------------------------------


def job_dirname(override_dirname: object, num: object) -> str:
    """A job's folder name: its overrides (`recipe.alpha=0.25,recipe=krea_schnell`) as a safe folder name.

    Characters that cannot or should not be in a name (path separators above all: `recipe.sources.krea=/data/k`
    must not become a path) are replaced by '_'; a name that is too long is cut and made unique again with a
    hash of the whole. A job without overrides is named by its number.
    """
    text = str(override_dirname or "")
    if not text:
        return f"job{num}"
    name = UNSAFE.sub("_", text)
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME]}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    return name


OmegaConf.register_new_resolver("fluxrecipe.job_dirname", job_dirname, replace=True)
# conf/hydra/launcher/joblib.yaml replaces the joblib plugin's preset of the same name (n_jobs 2, not one job
# per core); Hydra still checks it against the plugin's schema, which is right, and warns that it does.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema", category=UserWarning)


# --- the command line of a multirun ---------------------------------------------------------------


def is_multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun", "hydra.mode=MULTIRUN") for a in argv)


def defer_recipe_overrides(argv: list[str]) -> list[str]:
    """`-m recipe=a,b recipe.alpha=0.2`: make `recipe.alpha=0.2` a sweep of one value, applied per job.

    Hydra composes a multirun's own config without its sweeps, so where the recipe is swept (on the command
    line or in a sweep file) that config has no `recipe` node and a plain `recipe.X=V` cannot be applied to
    it ("Key 'recipe' is not in struct"). As a sweep of one value, `recipe.X=choice(V)`, it is applied to
    each job's config only, where the recipe is chosen; each job gets exactly `recipe.X=V`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if re.match(r"\+*recipe\.", arg):
            try:
                o = parser.parse_override(arg)
            except Exception:  # noqa: BLE001 - not an override we understand: Hydra will say what is wrong
                o = None
            if o is not None and not o.is_sweep_override() and not o.is_delete():
                arg = f"{o.get_key_element()}=choice({o.get_value_element_as_str()})"
        out.append(arg)
    return out


# --- one job of a multirun -----------------------------------------------------------------------------


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_recorded(cfg: DictConfig, job: Callable[[DictConfig], Any], show_traceback: bool) -> dict[str, Any]:
    """Run one job of a multirun; never raise for a failed job: log it as one message and record it.

    Hydra's sweeper re-raises a job's exception after the batch and then skips the end-of-sweep callbacks,
    so a failure must stay inside the job. The process's exit status reports it at the end (see failed()).
    Returns the job's record (plain data: a launcher may carry it back from another process or machine).
    """
    global _failed_here
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    status: dict[str, Any] = {"status": OK, "error": None, "overrides": list(HydraConfig.get().overrides.task)}
    started = time.monotonic()
    value = None
    try:
        if cfg.get("output"):
            raise UsageError(output_problem(cfg.output))
        value = job(cfg)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a SLURM time limit): the sweep stops; say where it stopped
        status.update(status=FAILED, error="interrupted (Ctrl-C or SIGTERM, e.g. a time limit)", seconds=round(time.monotonic() - started, 3))
        replace_json(job_dir / JOB_STATUS_NAME, status)
        raise
    except Exception as e:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the sweep
        _failed_here += 1
        user_error = isinstance(e, FluxRecipeError)
        message = str(e) if user_error else f"{type(e).__name__}: {e}"
        status.update(status=FAILED, error=message)
        log.error(f"fluxrecipe: error in job {job_dir.name}: {message}")
        if show_traceback or not user_error:  # an exception that is not a FluxRecipeError is a bug: show where
            log.error("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    from .execute import Result  # here, not at the top: `summary` has no use for torch

    status["seconds"] = round(time.monotonic() - started, 3)
    if isinstance(value, Result):  # a dry run returns the Plan
        output = os.path.relpath(value.output, job_dir)  # no absolute local path in a file of the sweep
        status.update(output=output, bytes_read=value.bytes_read, bytes_written=value.bytes_written)
    elif value is not None:
        status["status"] = DRY_RUN
    replace_json(job_dir / JOB_STATUS_NAME, status)
    return status


def output_problem(output: object) -> str:
    return (
        f"output={output}: a multirun writes one model per job, each to <sweep dir>/<job>/transformer; "
        "choose where the sweep goes with hydra.sweep.dir=FOLDER instead"
    )


def failed() -> int:
    """Failed (or unfinished) jobs of the multirun this process ran: from its summary, else as counted here."""
    if _last_summary is not None:
        return len(_last_summary.failed)
    return _failed_here + (1 if _summary_error else 0)


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

    def override_map(self) -> dict[str, str]:
        return dict(_split_override(o) for o in self.overrides)

    @property
    def weights(self) -> str:
        """Whether the model folder still holds its weights ('deleted': keep_weights=false, or by hand)."""
        if self.output is None or not self.output.is_dir():
            return ""
        return "kept" if any(self.output.glob("*.safetensors")) else "deleted"


class DamagedFile(ValueError):
    """A sweep state file that cannot be what a job wrote: the job's row says which and why."""


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key, value


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
    if status["output"]:
        job.output = folder / status["output"]  # relative to the job folder (an absolute one: as a job wrote it before)
        if not job.output.exists() and (folder / job.output.name).exists():  # the sweep folder was moved or copied
            job.output = folder / job.output.name
        job.overall, job.blocks = _diagnostics(job.output / "diagnostics.json")
    from .preview import PREVIEW_DIR, read_previews

    try:
        job.preview_settings, job.previews = read_previews(folder / PREVIEW_DIR)
    except (OSError, ValueError) as e:
        job.preview_error = f"{name}/{PREVIEW_DIR}/previews.json cannot be read: {e}"
    return job


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
    if record["status"] not in (OK, FAILED, DRY_RUN):
        raise DamagedFile(f"{where}: status {record['status']!r} is none of {OK}, {FAILED}, {DRY_RUN}")
    return record


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


# --- the summary -------------------------------------------------------------------------------------


@dataclass
class Summary:
    sweep_dir: Path
    jobs: list[Job]
    swept: list[str]  # the override keys whose value differs between jobs
    sources: list[str]
    files: list[Path]

    @property
    def title(self) -> str:
        """The sweep dir's last two parts: multirun/DATE/TIME -> DATE/TIME."""
        return "/".join(self.sweep_dir.parts[-2:])

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status not in (OK, DRY_RUN)]

    def columns(self) -> list[str]:
        distances = [f"distance_to_{s}" for s in self.sources]
        return ["job", *self.swept, "status", "seconds", "bytes_written", *distances, "weights", "previews", "output", "overrides", "error"]

    def rows(self) -> list[list[str]]:
        return [self._row(j) for j in self.jobs]

    def _row(self, job: Job) -> list[str]:
        values = job.override_map()
        output = ""
        if job.output is not None:
            output = job.output.relative_to(self.sweep_dir).as_posix() if job.output.is_relative_to(self.sweep_dir) else str(job.output)
        return [
            job.name,
            *[values.get(k, "") for k in self.swept],
            job.status,
            _text(job.seconds),
            _text(job.bytes_written),
            *[_text(job.overall.get(s)) for s in self.sources],
            job.weights,
            _text(len(job.previews) or None),
            output,
            " ".join(job.overrides),
            "; ".join(e for e in (job.error, job.preview_error) if e),
        ]

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(self.columns()) + " |", "|" + "---|" * len(self.columns())]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows()]
        ok = len(self.jobs) - len(self.failed)
        head = f"# Sweep {self.title}\n\n{counted(len(self.jobs), 'job')}: {ok} ok, {len(self.failed)} failed or unfinished. "
        head += "distance_to_S: relative L2 distance of the merged model to source S (0: S itself), over all blocks.\n\n"
        written = {f.name for f in self.files}
        images = [(alt, name) for alt, name in (("previews: a row per prompt and seed, a column per job", "grid.png"), ("per-block distance to each source", SUMMARY_PNG)) if name in written]
        return head + "\n".join(lines) + "\n" + "".join(f"\n![{alt}]({name})\n" for alt, name in images)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def summarize(sweep_dir: Path, plot: bool = True, jobs: list[Job] | None = None) -> Summary:
    """Read the sweep folder and write summary.csv, summary.md, summary_blocks.csv, summary.png, grid.png (the
    previews) and index.html into it. `plot=False` leaves out (and leaves as they are) the two PNGs."""
    from . import grid

    sweep_dir = Path(sweep_dir).resolve()
    jobs = read_jobs(sweep_dir) if jobs is None else jobs
    summary = Summary(sweep_dir, jobs, _swept_keys(jobs), _sources(jobs), files=[])
    _write_csv(sweep_dir / SUMMARY_CSV, summary.columns(), summary.rows())
    summary.files.append(sweep_dir / SUMMARY_CSV)
    blocks = [[j.name, block, src, _text(d)] for j in jobs for block, by_src in j.blocks.items() for src, d in by_src.items()]
    _write_csv(sweep_dir / BLOCKS_CSV, ["job", "block", "source", "distance"], blocks)
    summary.files.append(sweep_dir / BLOCKS_CSV)
    png = sweep_dir / SUMMARY_PNG
    if plot and any(j.blocks for j in jobs):
        if _plot(summary, png):
            summary.files.append(png)
    elif plot:
        png.unlink(missing_ok=True)  # no job has diagnostics (any more): no plot, and no stale one
    previews = grid.build(summary)
    grid_png = sweep_dir / grid.GRID_PNG
    if plot and previews is not None:
        grid.draw(previews, summary, grid_png)
        summary.files.append(grid_png)
    elif plot:
        grid_png.unlink(missing_ok=True)  # no job has previews (any more)
    summary.files.insert(0, sweep_dir / SUMMARY_MD)
    (sweep_dir / SUMMARY_MD).write_text(summary.markdown())
    summary.files.append(sweep_dir / grid.INDEX_HTML)
    (sweep_dir / grid.INDEX_HTML).write_text(grid.index_html(summary, previews))
    return summary


def _swept_keys(jobs: list[Job]) -> list[str]:
    maps = [j.override_map() for j in jobs]
    keys = list(dict.fromkeys(k for m in maps for k in m))
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def _sources(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(s for j in jobs for s in j.overall))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def label(swept: list[str], job: Job) -> str:
    """What tells a job apart from the others: its values of the swept overrides, else its folder."""
    values = job.override_map()
    return ", ".join(f"{k}={values[k]}" for k in swept if k in values) or job.name


def block_label(block: str) -> str:
    return block.replace("single_transformer_blocks.", "single.").replace("transformer_blocks.", "double.")


def figure(summary: Summary):
    """The plot: per source a panel, x = blocks in model order, one line per job (its swept overrides)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    jobs = [j for j in summary.jobs if j.blocks]
    swept = _swept_keys(jobs)  # among the jobs plotted: a failed job's values would only add noise
    blocks = sorted({b for j in jobs for b in j.blocks}, key=block_order)
    width = min(24.0, max(7.0, 0.22 * len(blocks) + 3.5))
    fig, axes = plt.subplots(len(summary.sources), 1, figsize=(width, 2.8 * len(summary.sources) + 1.0), sharex=True, squeeze=False)
    colors = plt.get_cmap("tab10" if len(jobs) <= 10 else "viridis")
    x = list(range(len(blocks)))
    for ax, src in zip(axes[:, 0], summary.sources):
        for i, job in enumerate(jobs):
            y = [_nan(job.blocks.get(b, {}).get(src)) for b in blocks]
            color = colors(i) if len(jobs) <= 10 else colors(i / max(1, len(jobs) - 1))
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, color=color, label=label(swept, job))
        ax.set_ylabel(f"distance to {src}")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xticks(x)
    bottom.set_xticklabels([block_label(b) for b in blocks], rotation=90, fontsize=7)
    bottom.set_xlabel("block (double.N: transformer_blocks.N, single.N: single_transformer_blocks.N)")
    fig.suptitle(f"Sweep {summary.title}: relative L2 distance of each merge to each source, per block")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="job")
    fig.tight_layout()
    return fig


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _plot(summary: Summary, path: Path) -> bool:
    try:
        fig = figure(summary)
    except ImportError:
        log.warning("fluxrecipe: matplotlib is not installed: no summary.png (pip install 'fluxrecipe[sweep]')")
        return False
    from matplotlib import pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def report(summary: Summary) -> str:
    ok = len(summary.jobs) - len(summary.failed)
    lines = [f"fluxrecipe: sweep {summary.sweep_dir}: {counted(len(summary.jobs), 'job')}, {ok} ok, {len(summary.failed)} failed or unfinished"]
    lines += [f"  {j.status}: {j.name}: {j.error}" for j in summary.failed]
    lines += [f"  warning: {j.name}: {j.preview_error}" for j in summary.jobs if j.preview_error and j not in summary.failed]
    lines += [f"  summary: {f}" for f in summary.files]
    return "\n".join(lines)


# --- the Hydra callback and the command -----------------------------------------------------------


class SweepSummary(Callback):
    """Registered in conf/config.yaml under hydra.callbacks: writes the summary when a multirun ends.

    It runs in the process that launched the sweep; with joblib or submitit the jobs ran elsewhere, so
    everything comes from the files the jobs left in the sweep folder.
    """

    def __init__(self) -> None:
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = str(config.hydra.sweep.dir)  # resolved now: ${now:...} must not move by the end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_summary, _summary_error
        sweep_dir = Path(self.sweep_dir or str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        try:
            _last_summary = summarize(sweep_dir)
        except Exception as e:  # noqa: BLE001 - Hydra would only warn; say it, and fail the process at the end
            _summary_error = f"{type(e).__name__}: {e}"
            print(f"fluxrecipe: error: the sweep's summary could not be written ({_summary_error}); "
                  f"once fixed: python -m fluxrecipe summary {sweep_dir}", file=sys.stderr, flush=True)
            return
        print(report(_last_summary), file=sys.stderr if _last_summary.failed else sys.stdout, flush=True)


def main(argv: list[str]) -> int:
    """`python -m fluxrecipe summary SWEEP_DIR`: write the summary of an existing sweep folder again."""
    parser = argparse.ArgumentParser(
        prog="fluxrecipe summary",
        description="Rebuild summary.csv, summary.md, summary_blocks.csv, summary.png, grid.png (the previews) and index.html "
        "of a sweep folder from its job folders. Exit status 1 when a job failed or did not finish.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the folder of a multirun (multirun/DATE/TIME, or hydra.sweep.dir)")
    parser.add_argument("--no-plot", action="store_true", help="write the tables only (no summary.png, no grid.png)")
    args = parser.parse_args(argv)
    folder = args.sweep_dir
    refusal = None
    if not folder.is_dir():
        refusal = "no such folder"
    elif not is_sweep(folder):
        refusal = (
            f"a single run, not a sweep: there is nothing to summarize (its model is in {folder / 'transformer'} unless output= was given)"
            if (folder / ".hydra" / "hydra.yaml").is_file()
            else f"not a sweep folder (no {MULTIRUN_YAML}): give the folder of a multirun (multirun/DATE/TIME, or its hydra.sweep.dir)"
        )
    elif not (jobs := read_jobs(folder.resolve())):
        refusal = "no job folders (.hydra/overrides.yaml) found: the sweep started no job"
    if refusal:
        print(f"fluxrecipe summary: {folder}: {refusal}; nothing was written", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary = summarize(folder, plot=not args.no_plot, jobs=jobs)
    except OSError as e:
        print(f"fluxrecipe summary: {folder}: cannot write the summary: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.markdown())
    print(report(summary), file=sys.stderr if summary.failed else sys.stdout)
    return EXIT_FAILED if summary.failed else 0
