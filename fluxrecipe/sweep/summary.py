"""The table of a sweep: one row per job (its swept values, status, time, bytes, distances, output,
overrides, error), for summary.csv, summary.md and the page. Everything in a job record came from a stranger's
recipe or a file: the Markdown escapes it (no raw HTML, no link, no broken table cell), as the page does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..text import counted, markdown_cell, markdown_text
from .grid import GRID_PNG
from .plot import SUMMARY_PNG
from .records import DRY_RUN, OK, Job, sweep_relative

SUMMARY_MD = "summary.md"


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

    @property
    def scores(self) -> list[str]:
        """The scores the jobs have (preview.score), in the order they were asked for."""
        return list(dict.fromkeys(name for j in self.jobs for name in j.scores))

    @property
    def pareto(self) -> bool:
        """The jobs were searched for a Pareto front (search.objective is a list)."""
        return any(isinstance(j.objective, list) for j in self.jobs)

    def ranked(self) -> list[Job]:
        """The scored jobs, best first: by the objective (search.objective), else by the first score; with a
        Pareto objective, the jobs of the front (none better on every objective), in job order."""
        scored = [j for j in self.jobs if j.status == OK and j.scores]
        if self.pareto:
            values = {j.name: j.objective for j in scored if isinstance(j.objective, list)}
            return [j for j in scored if j.name in values and not any(_dominates(values[o], values[j.name]) for o in values)]
        if any(j.objective is not None for j in scored):
            return sorted((j for j in scored if j.objective is not None), key=lambda j: -j.objective)
        first = self.scores[0] if self.scores else None
        return sorted((j for j in scored if first in j.scores), key=lambda j: -j.scores[first])

    def columns(self) -> list[str]:
        distances = [f"distance_to_{s}" for s in self.sources]
        scored = [*self.scores, *(["objective"] if any(j.objective is not None for j in self.jobs) else []), *(["parents"] if any(j.parents for j in self.jobs) else [])]
        rank = ["pareto" if self.pareto else "rank"] if self.scores else []
        return ["job", *self.swept, "status", *scored, *rank, "seconds", "bytes_written", *distances, "weights", "previews", "output", "overrides", "error"]

    def rows(self) -> list[list[str]]:
        ranked = self.ranked()
        marks = {j.name: "front" for j in ranked} if self.pareto else {j.name: f"{i}" + (" (best)" if i == 1 else "") for i, j in enumerate(ranked, 1)}
        return [self._row(j, marks) for j in self.jobs]

    def _row(self, job: Job, marks: dict[str, str]) -> list[str]:
        values = job.override_map()
        output = sweep_relative(job.output, self.sweep_dir) or ""
        columns = self.columns()
        objective = " / ".join(map(cell_text, job.objective)) if isinstance(job.objective, list) else cell_text(job.objective)
        scored = [cell_text(job.scores.get(name)) for name in self.scores]
        scored += [objective] if "objective" in columns else []
        scored += [f"{job.parents['better']} of {job.parents['of']}" if job.parents else ""] if "parents" in columns else []
        scored += [marks.get(job.name, "")] if self.scores else []
        return [
            job.name,
            *[values.get(k, "") for k in self.swept],
            job.status,
            *scored,
            cell_text(job.seconds),
            cell_text(job.bytes_written),
            *[cell_text(job.overall.get(s)) for s in self.sources],
            job.weights,
            cell_text(len(job.previews) or None),
            output,
            " ".join(job.overrides),
            "; ".join(e for e in (job.error, job.preview_error) if e),
        ]

    def markdown(self) -> str:
        """summary.md: every value from a job record (an override, an error, a path) as text Markdown shows as
        it is, printable (an escape sequence is written out, as on a terminal)."""
        lines = ["| " + " | ".join(markdown_cell(c) for c in self.columns()) + " |", "|" + "---|" * len(self.columns())]
        lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in self.rows()]
        ok = len(self.jobs) - len(self.failed)
        head = f"# Sweep {markdown_text(self.title)}\n\n{counted(len(self.jobs), 'job')}: {ok} ok, {len(self.failed)} failed or unfinished. "
        head += "distance_to_S: relative L2 distance of the merged model to source S (0: S itself), over all blocks.\n\n"
        if self.scores:
            head += score_note(self) + "\n\n"
        written = {f.name for f in self.files}
        images = [(alt, name) for alt, name in (("previews: a row per prompt and seed, a column per job", GRID_PNG), ("per-block distance to each source", SUMMARY_PNG)) if name in written]
        return head + "\n".join(lines) + "\n" + "".join(f"\n![{alt}]({name})\n" for alt, name in images)


def score_note(summary: Summary) -> str:
    """What the score columns hold, and the best job (or the Pareto front)."""
    ranked = summary.ranked()
    text = f"{', '.join(summary.scores)}: mean score of the job's preview images (higher is better)"
    text += "; parents: images better than every unmerged parent on every score" if any(j.parents for j in summary.jobs) else ""
    if summary.pareto:
        return text + f". Pareto front: {', '.join(j.name for j in ranked) or 'none'}."
    return text + (f". Best: {ranked[0].name}." if ranked else ".")


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def cell_text(value: object) -> str:
    """A number or a missing value as a table cell shows it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
