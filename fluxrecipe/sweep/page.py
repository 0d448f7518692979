"""index.html: the page of a sweep, the one a person opens to choose a merge: the preview grid, every preview
(linked at full size) and the summary table. Everything from a job record is escaped as HTML."""

from __future__ import annotations

import html
import os
from urllib.parse import quote

from .grid import GRID_PNG, Grid
from .previews import PREVIEW_DIR
from .records import sweep_relative
from .summary import Summary

INDEX_HTML = "index.html"


def index_html(summary: Summary, grid: Grid | None) -> str:
    """The page of the sweep: the grid, every preview (linked at full size), and the summary table."""
    esc = html.escape
    ok = len(summary.jobs) - len(summary.failed)
    parts = [
        "<!doctype html>",
        f'<html><head><meta charset="utf-8"><title>Sweep {esc(summary.title)}</title>',
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px;vertical-align:top;font-size:13px}td.empty{background:#e4e4e4;color:#962828;max-width:16em}"
        "img.cell{max-width:256px;display:block}img.grid{max-width:100%}</style></head><body>",
        f"<h1>Sweep {esc(summary.title)}</h1>",
        f"<p>{len(summary.jobs)} jobs: {ok} ok, {len(summary.failed)} failed or unfinished.</p>",
    ]
    if grid is not None:
        settings = _settings_line(summary)
        parts += [f"<h2>Previews</h2><p>{esc(settings)}</p>", f'<p><a href="{GRID_PNG}"><img class="grid" src="{GRID_PNG}" alt="grid of previews"></a></p>']
        parts.append("<table><tr><th>prompt, seed</th>" + "".join(f"<th>{esc(text)}</th>" for _, text in grid.columns) + "</tr>")
        for (prompt, seed), cells in zip(grid.rows, grid.cells):
            row = [f"<td>seed {seed}: {esc(prompt)}</td>"]
            for cell in cells:
                if cell.file is None:
                    row.append(f'<td class="empty">{esc(cell.note)}</td>')
                else:
                    href = esc(quote(sweep_relative(cell.file, summary.sweep_dir) or ""))
                    row.append(f'<td><a href="{href}"><img class="cell" src="{href}" alt="{esc(prompt)}, seed {seed}"></a></td>')
            parts.append("<tr>" + "".join(row) + "</tr>")
        parts.append("</table>")
    columns = summary.columns()
    parts.append("<h2>Summary</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in summary.rows()]
    parts.append("</table>")
    links = [f'<a href="{esc(quote(f.name))}">{esc(f.name)}</a>' for f in summary.files if f.name != INDEX_HTML]
    parts.append(f"<p>{' · '.join(links)}</p></body></html>")
    return "\n".join(parts) + "\n"


def _settings_line(summary: Summary) -> str:
    """The preview settings of the jobs (those of the first job that has them; swept ones are in the labels)."""
    for job in summary.jobs:
        if job.preview_settings:
            s = job.preview_settings
            guidance = f"guidance {s.get('guidance')}" if s.get("guidance") is not None else "no guidance"
            pipeline = str(s.get("pipeline"))
            if pipeline.startswith("../"):  # a local folder, relative to the job's previews folder: say it from the sweep's
                pipeline = os.path.relpath(os.path.normpath(job.folder / PREVIEW_DIR / pipeline), summary.sweep_dir)
            return f"{s.get('steps')} steps, {guidance}, {s.get('width')}x{s.get('height')}, pipeline {pipeline}"
    return ""
