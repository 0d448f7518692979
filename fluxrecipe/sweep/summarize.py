"""Writing a sweep's summary from its job records: summary.csv, summary_blocks.csv, summary.md, summary.png
(plot.py), grid.png (grid.py) and index.html (page.py). The end of a multirun writes it (the command line's
SweepSummary callback); `fluxrecipe summary SWEEP_DIR` writes it again from an existing sweep folder.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..text import counted, printable
from . import grid, page, plot
from .labels import differing
from .records import Job, read_jobs
from .summary import SUMMARY_MD, Summary, cell_text, score_note

SUMMARY_CSV, BLOCKS_CSV = "summary.csv", "summary_blocks.csv"
IMAGES_CSV = "summary_images.csv"  # a row per job, prompt and seed: each image's scores (preview.score)
OPTUNA_RESULTS = "optimization_results.yaml"


def summarize(sweep_dir: Path, draw: bool = True, jobs: list[Job] | None = None) -> Summary:
    """Read the sweep folder and write summary.csv, summary.md, summary_blocks.csv, summary.png, grid.png (the
    previews) and index.html into it. `draw=False` leaves out (and leaves as they are) the two PNGs."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs = read_jobs(sweep_dir) if jobs is None else jobs
    summary = Summary(sweep_dir, jobs, differing([j.overrides for j in jobs]), _sources(jobs), files=[])
    _write_csv(sweep_dir / SUMMARY_CSV, summary.columns(), summary.rows())
    summary.files.append(sweep_dir / SUMMARY_CSV)
    blocks = [[j.name, block, src, cell_text(d)] for j in jobs for block, by_src in j.blocks.items() for src, d in by_src.items()]
    _write_csv(sweep_dir / BLOCKS_CSV, ["job", "block", "source", "distance"], blocks)
    summary.files.append(sweep_dir / BLOCKS_CSV)
    if summary.scores:
        images = [[j.name, _prompt(j, i["prompt"]), i["seed"], *[cell_text(i.get(s)) for s in summary.scores]] for j in jobs for i in j.image_scores]
        _write_csv(sweep_dir / IMAGES_CSV, ["job", "prompt", "seed", *summary.scores], images)
        summary.files.append(sweep_dir / IMAGES_CSV)
    else:
        (sweep_dir / IMAGES_CSV).unlink(missing_ok=True)
    png = sweep_dir / plot.SUMMARY_PNG
    if draw and any(j.blocks for j in jobs):
        if plot.draw(jobs, summary.sources, summary.title, png):
            summary.files.append(png)
    elif draw:
        png.unlink(missing_ok=True)  # no job has diagnostics (any more): no plot, and no stale one
    previews = grid.build(jobs, summary.swept)
    grid_png = sweep_dir / grid.GRID_PNG
    if draw and previews is not None:
        grid.draw(previews, sweep_dir, grid_png)
        summary.files.append(grid_png)
    elif draw:
        grid_png.unlink(missing_ok=True)  # no job has previews (any more)
    if (sweep_dir / OPTUNA_RESULTS).is_file():  # hydra/sweeper=optuna's best trial (or Pareto front)
        summary.files.append(sweep_dir / OPTUNA_RESULTS)
    summary.files.insert(0, sweep_dir / SUMMARY_MD)
    (sweep_dir / SUMMARY_MD).write_text(summary.markdown())
    summary.files.append(sweep_dir / page.INDEX_HTML)
    (sweep_dir / page.INDEX_HTML).write_text(page.index_html(summary, previews))
    return summary


def _prompt(job: Job, index: int) -> str:
    """A prompt, by its index in the job's preview settings (the scores name it so)."""
    prompts = job.preview_settings.get("prompts") or []
    return prompts[index] if isinstance(index, int) and 0 <= index < len(prompts) else str(index)


def _sources(jobs: list[Job]) -> list[str]:
    return list(dict.fromkeys(s for j in jobs for s in j.overall))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def report(summary: Summary) -> str:
    """What the end of a sweep says on the terminal: counts, the failed jobs and where the summary is, every
    text from a job record made printable (an escape sequence in an error is shown, not obeyed)."""
    ok = len(summary.jobs) - len(summary.failed)
    lines = [f"fluxrecipe: sweep {summary.sweep_dir}: {counted(len(summary.jobs), 'job')}, {ok} ok, {len(summary.failed)} failed or unfinished"]
    lines += [f"  {j.status}: {j.name}: {j.error}" for j in summary.failed]
    lines += [f"  warning: {j.name}: {j.preview_error}" for j in summary.jobs if j.preview_error and j not in summary.failed]
    lines += [f"  {score_note(summary)}"] if summary.scores else []
    lines += [f"  summary: {f}" for f in summary.files]
    return "\n".join(printable(line) for line in lines)
