"""The XY grid of a sweep's previews, built from the files the jobs left (it is rebuilt by `summary DIR`).

`grid.png`: a row per prompt and seed, a column per job in sweep order, each column labelled with what
differs between the jobs (labels.py); a job that failed (or left no image) is a labelled empty cell. Its
layout (labels, and the box and file of every cell) is stored in the PNG itself, as the text chunk
`fluxrecipe.grid`, so a program can tell what it shows. Needs Pillow (the preview extra, which made the
images).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .labels import label
from .records import OK, Job, sweep_relative

GRID_PNG = "grid.png"
GRID_KEY = "fluxrecipe.grid"  # the PNG text chunk that holds the layout
MAX_CELL = 512  # larger previews are scaled down in the grid (index.html links the full images)
MIN_COLUMN, ROW_HEADER, PAD, FONT_SIZE = 150, 240, 6, 13
BACKGROUND, EMPTY, TEXT, FAINT = (255, 255, 255), (228, 228, 228), (20, 20, 20), (150, 40, 40)
HEADER_LINES, ROW_LINES, NOTE_LINES = 4, 8, 5


@dataclass(frozen=True)
class Cell:
    file: Path | None  # the image, or None: an empty cell
    note: str = ""  # why a cell is empty ("failed: ...", "no image")
    image: Any = None  # the image as drawn in the grid (a PIL image, scaled down to MAX_CELL at most)
    size: tuple[int, int] | None = None  # the image file's own width and height (index.html shows it so)


@dataclass(frozen=True)
class Grid:
    columns: list[tuple[Job, str]]  # job, its label, in sweep order
    rows: list[tuple[str, int]]  # (prompt, seed)
    cells: list[list[Cell]]  # [row][column]


def build(jobs: list[Job], swept: list[str]) -> Grid | None:
    """The grid of the jobs' previews (a column per job, labelled with its values of the `swept` keys), or
    None when no job has any."""
    if not any(j.previews for j in jobs):
        return None
    rows = list(dict.fromkeys((p["prompt"], p["seed"]) for j in jobs for p in j.previews))
    columns, cells = [], [[] for _ in rows]
    for job in jobs:
        status = "" if job.status == OK else f" ({job.status})"
        columns.append((job, job_label(job, swept) + status))
        files = {(p["prompt"], p["seed"]): p["file"] for p in job.previews}
        for i, row in enumerate(rows):
            cells[i].append(_cell(job, files.get(row)))
    return Grid(columns, rows, cells)


def job_label(job: Job, swept: list[str]) -> str:
    """What a job is called in the grid and on the page: its values of the swept keys (its folder's name in a
    sweep of one job)."""
    return label(swept, job.overrides) or job.name


def _cell(job: Job, file: Path | None) -> Cell:
    from PIL import Image, UnidentifiedImageError

    if job.status != OK:
        return Cell(None, f"{job.status}: {job.error or ''}".strip(": "))
    if file is None or not file.exists():
        return Cell(None, job.preview_error or "no image")
    try:
        if not file.is_file():
            raise ValueError("not a regular file")
        with Image.open(file) as image:
            image = image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        return Cell(None, f"{file.name} cannot be read: {e}")
    size = image.size
    if max(size) > MAX_CELL:
        image.thumbnail((MAX_CELL, MAX_CELL))
    return Cell(file, image=image, size=size)


def draw(grid: Grid, sweep_dir: Path, path: Path) -> None:
    """grid.png, with its layout in the text chunk GRID_KEY."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    images = [[c.image for c in row] for row in grid.cells]
    sizes = [im.size for row in images for im in row if im is not None] or [(64, 64)]
    cell_w, cell_h = max(w for w, _ in sizes), max(h for _, h in sizes)
    column_w = max(cell_w, MIN_COLUMN) + PAD
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = FONT_SIZE + 4
    labels = [_wrap(measure, text, font, column_w - PAD, HEADER_LINES) for _, text in grid.columns]
    header_h = line_h * max(len(lines) for lines in labels) + 2 * PAD
    row_h = cell_h + PAD
    width, height = ROW_HEADER + column_w * len(grid.columns), header_h + row_h * len(grid.rows)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    pen = ImageDraw.Draw(canvas)
    layout = {"columns": [], "rows": [{"prompt": p, "seed": s} for p, s in grid.rows], "cells": []}
    for c, ((job, text), lines) in enumerate(zip(grid.columns, labels)):
        x = ROW_HEADER + c * column_w
        _text(pen, x, PAD, lines, font, line_h, TEXT)
        layout["columns"].append({"job": job.name, "label": text, "status": job.status})
    for r, (prompt, seed) in enumerate(grid.rows):
        y = header_h + r * row_h
        lines = _wrap(measure, f"seed {seed}: {prompt}", font, ROW_HEADER - 2 * PAD, min(ROW_LINES, max(1, cell_h // line_h)))
        _text(pen, PAD, y, lines, font, line_h, TEXT)
        layout_row = []
        for c, (cell, image) in enumerate(zip(grid.cells[r], images[r])):
            x = ROW_HEADER + c * column_w
            if image is not None:
                canvas.paste(image, (x, y))
                box = [x, y, image.width, image.height]
            else:
                pen.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=EMPTY)
                _text(pen, x + PAD, y + PAD, _wrap(measure, cell.note, font, cell_w - 2 * PAD, max(1, min(NOTE_LINES, (cell_h - PAD) // line_h))), font, line_h, FAINT)
                box = [x, y, cell_w, cell_h]
            layout_row.append({"box": box, "file": sweep_relative(cell.file, sweep_dir), "note": cell.note})
        layout["cells"].append(layout_row)
    info = PngInfo()
    info.add_text(GRID_KEY, json.dumps(layout, ensure_ascii=False))
    canvas.save(path, pnginfo=info)


def read_layout(path: Path) -> dict:
    """The layout stored in a grid.png (labels, rows, and the box and file of every cell)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[GRID_KEY])


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, OSError):  # Pillow < 10.1, or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(measure, text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` in lines no wider than `width` (breaking long words), at most `max_lines`, the last one cut with '…'."""
    lines: list[str] = []
    line = ""
    for word in text.replace("\n", " ").split(" "):
        candidate = f"{line} {word}" if line else word
        if measure.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while measure.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and measure.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return lines


def _text(pen, x: int, y: int, lines: list[str], font, line_h: int, color) -> None:
    for i, line in enumerate(lines):
        pen.text((x, y + i * line_h), line, font=font, fill=color)
