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
    def score_names(self) -> list[str]:
        """The scores of the jobs' previews (issue 18: `clip`, `aesthetic`), in the order the records give them."""
        return list(dict.fromkeys(name for j in self.jobs for name in j.scores))

    def scored(self) -> list[str]:
        """The score columns: one per score, the objective and the parents comparison where any job has them."""
        extra = [name for name, has in (("objective", any(j.objective is not None for j in self.jobs)), ("parents", any(j.parents for j in self.jobs))) if has]
        return [*self.score_names, *extra]

    def best(self) -> Job | None:
        """The job to look at first: the highest objective, else the highest first score (the earlier job of a
        tie); None without scores."""
        ok = [j for j in self.jobs if j.status == OK]
        first = self.score_names[0] if self.score_names else None
        values = [j.objective for j in ok] if any(j.objective is not None for j in ok) else [j.scores.get(first) for j in ok]
        ranked = [(v, -i) for i, v in enumerate(values) if v is not None]
        return ok[-max(ranked)[1]] if ranked else None

    def columns(self) -> list[str]:
        distances = [f"distance_to_{s}" for s in self.sources]
        return ["job", *self.swept, "status", *self.scored(), "seconds", "bytes_written", *distances, "weights", "previews", "output", "overrides", "error"]

    def rows(self) -> list[list[str]]:
        scored = self.scored()
        return [self._row(j, scored) for j in self.jobs]

    def _row(self, job: Job, scored: list[str]) -> list[str]:
        values = job.override_map()
        output = sweep_relative(job.output, self.sweep_dir) or ""
        return [
            job.name,
            *[values.get(k, "") for k in self.swept],
            job.status,
            *[cell_text(job.scores.get(n)) for n in self.score_names],
            *([cell_text(job.objective)] if "objective" in scored else []),
            *([f"{job.parents['better']} of {job.parents['of']}" if job.parents else ""] if "parents" in scored else []),
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
        written = {f.name for f in self.files}
        images = [(alt, name) for alt, name in (("previews: a row per prompt and seed, a column per job", GRID_PNG), ("per-block distance to each source", SUMMARY_PNG)) if name in written]
        return head + "\n".join(lines) + "\n" + "".join(f"\n![{alt}]({name})\n" for alt, name in images)


def cell_text(value: object) -> str:
    """A number or a missing value as a table cell shows it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
