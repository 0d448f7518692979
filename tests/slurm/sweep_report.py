"""What tests/slurm/test-slurm.sh's sweep left, checked and shown: grid.png against the jobs' previews, and
summary.csv's rows. Usage: sweep_report.py SWEEP_DIR ALPHA... (the swept recipe.alpha values, in sweep order).

The grid is checked from the layout it stores (fluxrecipe.sweep.grid.read_layout): a column per alpha,
labelled `alpha=VALUE`, in sweep order; a row per seed; and every cell's pixels equal to the preview image
its job rendered. Prints the summary's ranked columns for the docs' quote; exits 1 with one line a problem.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageChops

from fluxrecipe.sweep.grid import GRID_PNG, read_layout
from fluxrecipe.sweep.summarize import SUMMARY_CSV

SHOWN = ("job", "recipe.alpha", "status", "previews")  # and every distance_to_SOURCE


def grid_problems(sweep: Path, alphas: list[str]) -> list[str]:
    layout = read_layout(sweep / GRID_PNG)
    problems = []
    labels = [c["label"] for c in layout["columns"]]
    if labels != [f"alpha={a}" for a in alphas]:
        problems.append(f"grid.png's columns are {labels}, expected alpha={', alpha='.join(alphas)}")
    with Image.open(sweep / GRID_PNG) as grid:
        canvas = grid.convert("RGB")
    for r, row in enumerate(layout["cells"]):
        for c, cell in enumerate(row):
            if not cell["file"]:
                problems.append(f"grid.png row {r} column {c} is empty: {cell['note']}")
                continue
            x, y, w, h = cell["box"]
            with Image.open(sweep / cell["file"]) as preview:
                if preview.size != (w, h) or ImageChops.difference(canvas.crop((x, y, x + w, y + h)), preview.convert("RGB")).getbbox():
                    problems.append(f"grid.png row {r} column {c} does not show {cell['file']}")
    return problems


def summary_table(sweep: Path) -> list[str]:
    with open(sweep / SUMMARY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c in SHOWN or c.startswith("distance_to_")]
    table = [columns, *[[row[c] for c in columns] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]


def main(sweep: Path, alphas: list[str]) -> int:
    problems = grid_problems(sweep, alphas)
    if problems:
        print("; ".join(problems))
        return 1
    layout = read_layout(sweep / GRID_PNG)
    seeds = ", ".join(f"seed {row['seed']}" for row in layout["rows"])
    print(f"grid.png: {len(layout['columns'])} columns ({', '.join(c['label'] for c in layout['columns'])}) x "
          f"{len(layout['rows'])} rows ({seeds}), every cell the job's own preview, pixel for pixel")
    print("summary.csv:")
    print("\n".join(f"  {line}" for line in summary_table(sweep)))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
