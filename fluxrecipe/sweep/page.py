"""index.html: the page of a sweep, the one a person opens to choose a merge (issue 23).

One grid of the previews (a row per prompt and seed, a column per job; over two swept keys, one key on each
axis), each image at its own size up to the page's width and linked at full size; two jobs compared side by
side or by flipping; the summary table, sortable, the best job marked. Jobs are labelled with what differs
between them (labels.py), their full overrides one click away. One file, its CSS and script inline, nothing
fetched from elsewhere: it works opened from disk, offline. Everything from a job record is escaped as HTML
and goes into the page's text and attributes only, never into its script.
"""

from __future__ import annotations

import html
import os
from itertools import permutations
from urllib.parse import quote

from .grid import Cell, Grid, job_label
from .labels import short_names
from .plot import SUMMARY_PNG
from .previews import PREVIEW_DIR
from .records import OK, Job, sweep_relative
from .summary import Summary, cell_text, score_note

INDEX_HTML = "index.html"
ROW_HEADER = 150  # px: the grid's first column (prompt and seed)
CELL_PAD = 10  # px around an image in the grid (padding and border)
MIN_COLUMN = 120  # px: a job's column in the grid is never narrower (its label must be readable)
SHORT = 40  # characters of a long value (a path, an error) that a cell of the summary shows; the rest in title=

STYLE = """
body{font-family:system-ui,sans-serif;margin:1em 1.5em;color:#1a1a1a}
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em;margin:1.2em 0 .4em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px;text-align:left}
table.grid th,td.long{overflow-wrap:anywhere}
details>summary{cursor:pointer;color:#345}details.overrides>summary{white-space:nowrap}
code{font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere}
.controls{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin:.4em 0;font-size:14px}
table.grid{table-layout:fixed;width:100%}
table.grid th.corner,table.grid th[scope=row]{width:""" + str(ROW_HEADER) + """px}
table.grid img{display:block;max-width:100%;height:auto}
body.actual table.grid{table-layout:auto;width:auto;max-width:none!important}
body.actual table.grid img{max-width:calc(100vw - 4em)}
.none{background:#e4e4e4;color:#962828;padding:4px;box-sizing:border-box;overflow-wrap:anywhere}
.scores,.muted{color:#555;font-size:12px}
.badge{display:inline-block;border-radius:3px;padding:0 4px;font-size:12px;background:#eee}
.best{background:#fff3c4}.badge.best{background:#f5c518}
.badge.failed,.badge.unfinished{background:#f3d0d0}
.cmp{display:flex;gap:1em;align-items:flex-start}
.cmp figure{margin:0;flex:0 1 auto;min-width:0}.cmp.side figure{max-width:calc(50% - .5em)}
.cmp img{display:block;max-width:100%;height:auto}.cmp.flip img{cursor:pointer}
.cmp figcaption{font-size:13px;margin-top:.2em;overflow-wrap:anywhere}
table.summary{width:100%}
table.summary th button{font:inherit;font-weight:bold;border:0;background:none;padding:0;cursor:pointer;text-align:left}
table.summary th[aria-sort=ascending] button::after{content:" \\25B2"}
table.summary th[aria-sort=descending] button::after{content:" \\25BC"}
td.num{text-align:right;white-space:nowrap}
"""

SCRIPT = r"""
(function () {
  'use strict';
  const $ = (s, e) => (e || document).querySelector(s);
  const $$ = (s, e) => Array.from((e || document).querySelectorAll(s));
  const grid = $('#grid');
  const heads = grid ? $$('thead th[data-j]', grid) : [];
  const cell = (r, j) => $('td[data-r="' + r + '"][data-j="' + j + '"]', grid);
  const head = j => heads.find(h => h.dataset.j === String(j));
  const copy = td => Array.from(td.childNodes).map(n => n.cloneNode(true));
  const el = (tag, text) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; return e; };

  const actual = $('#actual');
  if (actual) actual.addEventListener('change', () => document.body.classList.toggle('actual', actual.checked));

  // a swept key on each axis: the grid's cells, for the image chosen, rearranged
  const layout = $('#layout'), pivot = $('#pivot'), pick = $('#pick-image'), image = $('#image');
  function ordered(k) {
    const values = Array.from(new Set(heads.map(h => h.getAttribute('data-v' + k))));
    return values.every(v => v !== '' && !isNaN(v)) ? values.sort((a, b) => a - b) : values;
  }
  function drawLayout() {
    const option = layout.selectedOptions[0];
    if (!option.value) { grid.hidden = false; pivot.hidden = true; pick.hidden = true; return; }
    const [c, r] = option.value.split(',');
    const thead = el('thead'), tbody = el('tbody'), top = el('tr');
    top.append(el('th', option.dataset.rows + ' \\ ' + option.dataset.columns));
    top.firstChild.className = 'corner';
    const columns = ordered(c);
    columns.forEach(v => top.append(el('th', option.dataset.columns + '=' + v)));
    thead.append(top);
    ordered(r).forEach(rv => {
      const tr = el('tr'), th = el('th', option.dataset.rows + '=' + rv);
      th.scope = 'row';
      tr.append(th);
      columns.forEach(cv => {
        const td = el('td');
        const jobs = heads.filter(h => h.getAttribute('data-v' + c) === cv && h.getAttribute('data-v' + r) === rv);
        jobs.forEach(h => {
          td.append(...copy(cell(image.value, h.dataset.j)));
          if (jobs.length > 1) td.append(el('div', h.dataset.label));
        });
        tr.append(td);
      });
      tbody.append(tr);
    });
    pivot.replaceChildren(thead, tbody);
    pivot.style.maxWidth = grid.style.maxWidth;
    grid.hidden = true; pivot.hidden = false; pick.hidden = false;
  }
  if (layout) { layout.addEventListener('change', drawLayout); image.addEventListener('change', drawLayout); }

  // two jobs on the same prompt and seed: side by side, or one at a time (flip)
  const a = $('#cmp-a'), b = $('#cmp-b'), which = $('#cmp-image'), view = $('#cmp-view');
  let flipped = false;
  const mode = () => $('input[name="cmp-mode"]:checked').value;
  function figure(name, j) {
    const f = el('figure');
    f.append(...copy(cell(which.value, j)), el('figcaption', name + ': ' + head(j).dataset.label));
    return f;
  }
  function drawCompare() {
    view.className = 'cmp ' + mode();
    if (mode() === 'side') view.replaceChildren(figure('A', a.value), figure('B', b.value));
    else view.replaceChildren(flipped ? figure('B', b.value) : figure('A', a.value));
  }
  function flip() { flipped = !flipped; drawCompare(); }
  if (view) {
    [a, b, which, ...$$('input[name="cmp-mode"]')].forEach(x => x.addEventListener('change', () => { flipped = false; drawCompare(); }));
    view.addEventListener('click', e => { if (mode() === 'flip' && e.target.tagName === 'IMG') { e.preventDefault(); flip(); } });
    document.addEventListener('keydown', e => {
      if ((e.key === 'f' || e.key === 'F') && mode() === 'flip' && !/^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName)) flip();
    });
    drawCompare();
  }

  // the summary, sorted by any column: numbers as numbers ('3 of 4' as 0.75, '1 (best)' as 1), empty cells last
  const table = $('#summary');
  function key(td) {
    const s = td.dataset.sort;
    if (s === '') return null;
    const m = /^(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)(?: of (\d+)| \(.*\))?$/i.exec(s);
    return m ? (m[2] ? (+m[2] ? m[1] / m[2] : 0) : +m[1]) : s.toLowerCase();
  }
  $$('thead th', table).forEach((th, i) => th.querySelector('button').addEventListener('click', () => {
    const dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    $$('thead th', table).forEach(h => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', dir);
    const rows = Array.from(table.tBodies[0].rows);
    rows.sort((p, q) => {
      const x = key(p.cells[i]), y = key(q.cells[i]);
      if (x === null || y === null) return (x === null) - (y === null);
      const c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
      return dir === 'ascending' ? c : -c;
    });
    table.tBodies[0].append(...rows);
  }));
})();
"""


def index_html(summary: Summary, grid: Grid | None) -> str:
    """The page of the sweep: what differs between the jobs, the grid, the comparison of two jobs, the summary."""
    ok = len(summary.jobs) - len(summary.failed)
    ranked = summary.ranked()
    best = {j.name: "Pareto front" if summary.pareto else "best" for j in (ranked if summary.pareto else ranked[:1])}
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Sweep {esc(summary.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Sweep {esc(summary.title)}</h1>",
        f"<p>{len(summary.jobs)} jobs: {ok} ok, {len(summary.failed)} failed or unfinished. {_differs(summary)}</p>",
    ]
    if grid is not None:
        parts += _grid(summary, grid, best)
        parts += _compare(grid, best)
    parts += _summary(summary, best)
    if any(f.name == SUMMARY_PNG for f in summary.files):
        parts.append(f'<details><summary>Distance to each source, per block ({SUMMARY_PNG})</summary><img src="{SUMMARY_PNG}" alt="per-block distance to each source" style="max-width:100%"></details>')
    links = [f'<a href="{esc(quote(f.name))}">{esc(f.name)}</a>' for f in summary.files if f.name != INDEX_HTML]
    parts.append(f"<p>Files: {' · '.join(links)}</p>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def esc(text: object) -> str:
    """Text from a job record (or anything else) as HTML shows it, quotes included (safe in an attribute too)."""
    return html.escape(str(text), quote=True)


def _differs(summary: Summary) -> str:
    """'What differs: alpha (0, 0.5), recipe (tiny, tiny_nan).'"""
    if not summary.swept:
        return ""
    names = short_names(summary.swept)
    maps = [j.override_map() for j in summary.jobs]
    shown = [f"<b>{esc(names[k])}</b> ({esc(', '.join(dict.fromkeys(m.get(k, '(none)') for m in maps)))})" for k in summary.swept]
    return f"What differs: {', '.join(shown)}."


def _grid(summary: Summary, grid: Grid, best: dict[str, str]) -> list[str]:
    """The one grid: a row per prompt and seed, a column per job; and the choice of a swept key per axis."""
    sizes = [c.size for row in grid.cells for c in row if c.size] or [(256, 256)]
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    names = short_names(summary.swept)
    layouts = ['<option value="">columns: jobs, rows: prompt and seed</option>']
    for c, r in permutations(range(len(summary.swept)), 2):
        column, row = names[summary.swept[c]], names[summary.swept[r]]
        layouts.append(f'<option value="{c},{r}" data-columns="{esc(column)}" data-rows="{esc(row)}">columns: {esc(column)}, rows: {esc(row)}</option>')
    images = "".join(f'<option value="{i}">seed {seed}: {esc(prompt)}</option>' for i, (prompt, seed) in enumerate(grid.rows))
    controls = ['<div class="controls">']
    if len(layouts) > 1:
        controls.append(f'<label>Layout <select id="layout">{"".join(layouts)}</select></label>')
        controls.append(f'<label id="pick-image" hidden>image <select id="image">{images}</select></label>')
    controls.append('<label><input type="checkbox" id="actual"> each image at its own size (the grid scrolls)</label>')
    controls.append("<span class=\"muted\">Click an image to open it at full size.</span></div>")
    head = ['<tr><th class="corner">prompt, seed</th>']
    for j, (job, _) in enumerate(grid.columns):
        values = job.override_map()
        data = "".join(f' data-v{k}="{esc(values.get(key, ""))}"' for k, key in enumerate(summary.swept))
        head.append(f'<th data-j="{j}" data-label="{esc(job_label(job, summary.swept))}"{data}{_best_class(job, best)}>{_job_head(job, summary.swept, best)}</th>')
    rows = []
    for r, (prompt, seed) in enumerate(grid.rows):
        cells = "".join(_grid_cell(r, j, cell, job, prompt, seed, summary, width, height) for j, (cell, (job, _)) in enumerate(zip(grid.cells[r], grid.columns)))
        rows.append(f'<tr><th scope="row">{esc(prompt)}<br><span class="muted">seed {seed}</span></th>{cells}</tr>')
    most = ROW_HEADER + len(grid.columns) * max(width + CELL_PAD, MIN_COLUMN)
    return [
        f"<h2>Previews</h2><p>{esc(_settings_line(summary))}</p>",
        *controls,
        f'<div class="scroll"><table class="grid" id="grid" style="max-width:{most}px"><thead>{"".join(head)}</tr></thead>',
        f"<tbody>{''.join(rows)}</tbody></table>",
        '<table class="grid" id="pivot" hidden></table></div>',
    ]


def _job_head(job: Job, swept: list[str], best: dict[str, str]) -> str:
    """A grid column's head: the job's label, its status, its scores, and its full overrides one click away."""
    parts = [esc(job_label(job, swept))]
    if job.status != OK:
        parts.append(f'<span class="badge {esc(job.status)}">{esc(job.status)}</span>')
    if job.name in best:
        parts.append(_badge(job, best))
    if scores := _scores_text({**job.scores, "objective": job.objective}):
        parts.append(f'<div class="scores">{esc(scores)}</div>')
    parts.append(_overrides(job))
    return " ".join(parts)


def _grid_cell(r: int, j: int, cell: Cell, job: Job, prompt: str, seed: int, summary: Summary, width: int, height: int) -> str:
    where = f'data-r="{r}" data-j="{j}"'
    if cell.file is None:
        reason, _, _ = cell.note.partition(":")
        box = f'<div class="none" style="min-height:{height}px">'
        return f'<td class="empty" {where}>{box}<details><summary>{esc(reason)}</summary>{esc(cell.note)}</details></div></td>'
    href = esc(quote(sweep_relative(cell.file, summary.sweep_dir) or ""))
    w, h = cell.size or (width, height)
    image = f'<a href="{href}" target="_blank" rel="noopener"><img src="{href}" width="{w}" height="{h}" alt="{esc(job_label(job, summary.swept))}: {esc(prompt)}, seed {seed}"></a>'
    scores = _scores_text(_image_scores(job, prompt, seed))
    return f"<td {where}>{image}" + (f'<div class="scores">{esc(scores)}</div>' if scores else "") + "</td>"


def _image_scores(job: Job, prompt: str, seed: int) -> dict[str, float]:
    """The scores of one of the job's images; a record names its prompt by its index among the job's prompts."""
    prompts = list(dict.fromkeys(p["prompt"] for p in job.previews))
    for entry in job.image_scores:
        named = entry["prompt"] if isinstance(entry["prompt"], str) else (prompts[entry["prompt"]] if entry["prompt"] < len(prompts) else None)
        if named == prompt and entry["seed"] == seed:
            return {k: v for k, v in entry.items() if k not in ("prompt", "seed")}
    return {}


def _scores_text(scores: dict[str, float | list[float] | None]) -> str:
    """'clip 0.31 · aesthetic 5.2' (a Pareto search's objectives as '0.31 / 5.2')."""
    shown = {name: " / ".join(map(cell_text, v)) if isinstance(v, list) else cell_text(v) for name, v in scores.items() if v is not None}
    return " · ".join(f"{name} {value}" for name, value in shown.items())


def _compare(grid: Grid, best: dict[str, str]) -> list[str]:
    """Two jobs on the same prompt and seed, side by side or flipped; the best job and the next one first."""
    shown = [j for j, (job, _) in enumerate(grid.columns) if any(row[j].file for row in grid.cells)]
    if len(shown) < 2:
        return []
    first = next((j for j in shown if grid.columns[j][0].name in best), shown[0])
    second = next(j for j in shown if j != first)

    def choice(chosen: int) -> str:
        return "".join(f'<option value="{j}"{" selected" * (j == chosen)}>{esc(grid.columns[j][1])}</option>' for j in shown)

    images = "".join(f'<option value="{i}">seed {seed}: {esc(prompt)}</option>' for i, (prompt, seed) in enumerate(grid.rows))
    return [
        '<h2 id="compare">Compare two jobs</h2><div class="controls">',
        f'<label>A <select id="cmp-a">{choice(first)}</select></label><label>B <select id="cmp-b">{choice(second)}</select></label>',
        f'<label>image <select id="cmp-image">{images}</select></label>',
        '<label><input type="radio" name="cmp-mode" value="side" checked> side by side</label>',
        '<label><input type="radio" name="cmp-mode" value="flip"> flip (click the image, or press F)</label></div>',
        '<div id="cmp-view" class="cmp side"></div>',
    ]


def _summary(summary: Summary, best: dict[str, str]) -> list[str]:
    """The summary table: the rows of summary.csv, long values shortened (whole in title=), sortable."""
    columns, rows = summary.columns(), summary.rows()
    names = short_names(summary.swept)
    numeric = [all(_is_number(row[i]) for row in rows if row[i]) and any(row[i] for row in rows) for i in range(len(columns))]
    head = []
    for c in columns:
        title = f' title="{esc(c)}"' if c in names else ""
        head.append(f'<th{title}><button type="button">{esc(names.get(c, c)).replace("_", "_<wbr>")}</button></th>')
    body = []
    for job, row in zip(summary.jobs, rows):
        cells = [_summary_cell(c, value, job, best, numeric[i]) for i, (c, value) in enumerate(zip(columns, row))]
        body.append(f"<tr{_best_class(job, best)}>{''.join(cells)}</tr>")
    return [
        '<h2>Summary</h2><p class="muted">Click a column\'s name to sort by it.'
        + (f" {esc(score_note(summary))}" if summary.scores else "") + "</p>",
        f'<div class="scroll"><table class="summary" id="summary"><thead><tr>{"".join(head)}</tr></thead>',
        f"<tbody>{''.join(body)}</tbody></table></div>",
    ]


def _summary_cell(column: str, value: str, job: Job, best: dict[str, str], numeric: bool) -> str:
    sort = f' data-sort="{esc(value)}"'
    if numeric:
        return f'<td class="num"{sort}>{esc(value)}</td>'
    if column == "job":
        badge = f" {_badge(job, best)}" if job.name in best else ""
        return f"<td{sort}>{esc(value).replace(',', ',<wbr>')}{badge}</td>"  # a folder name: break between its values
    if column == "overrides":
        return f'<td class="long"{sort}>{_overrides(job)}</td>' if value else f"<td{sort}></td>"
    if column == "output" and value and job.output is not None:  # shown from its job's folder (the job column names it)
        shown = job.output.relative_to(job.folder).as_posix() if job.output.is_relative_to(job.folder) else value
        return f'<td{sort}><a href="{esc(quote(value))}" title="{esc(value)}">{esc(_shorten(shown)).replace("/", "/<wbr>")}</a></td>'
    if len(value) > SHORT:
        return f'<td class="long"{sort}><details><summary>{esc(_shorten(value))}</summary>{esc(value)}</details></td>'
    return f"<td{sort}>{esc(value)}</td>"


def _overrides(job: Job) -> str:
    """A job's full overrides, folded: one click away."""
    return f'<details class="overrides"><summary>overrides</summary><code>{esc(" ".join(job.overrides))}</code></details>'


def _best_class(job: Job, best: dict[str, str]) -> str:
    return ' class="best"' if job.name in best else ""


def _badge(job: Job, best: dict[str, str]) -> str:
    """'★ best' (or '★ Pareto front'): the job the scores rank first (or each job of the front)."""
    return f'<span class="badge best">&#9733; {best[job.name]}</span>'


def _shorten(text: str) -> str:
    """A long value as a narrow cell shows it: its start and end (where paths differ), the middle cut."""
    if len(text) <= SHORT:
        return text
    half = (SHORT - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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
