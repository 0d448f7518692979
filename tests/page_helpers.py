"""Shared by the page tests: a sweep folder written by hand, as its jobs would have left it (Hydra's files,
job records with scores, previews), and index.html read back as elements."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import yaml
from PIL import Image

from fluxrecipe.sweep import records
from fluxrecipe.sweep.previews import PREVIEW_DIR, PREVIEWS_JSON

PROMPTS = ["a photo of the cat", "a red house on the hill"]
SEEDS = [0, 1]


@dataclass
class FakeJob:
    folder: str
    overrides: list[str]
    record: dict = field(default_factory=lambda: {"status": "ok", "error": None, "seconds": 1.5, "bytes_written": 1000, "output": "transformer"})
    size: tuple[int, int] | None = (64, 48)  # its previews' width and height; None: no previews


def write_sweep(root: Path, jobs: list[FakeJob]) -> Path:
    """A sweep folder holding `jobs` (in this order), each with its overrides, record and previews: one PNG per
    prompt and seed, a flat colour that tells job, prompt and seed apart."""
    root.mkdir(parents=True)
    (root / records.MULTIRUN_YAML).write_text("hydra: {}\n")
    for num, job in enumerate(jobs):
        folder = root / job.folder
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(job.overrides))
        (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
        (folder / records.JOB_STATUS_NAME).write_text(json.dumps(job.record))
        if job.record.get("output"):
            (folder / job.record["output"]).mkdir()
        if job.size is None:
            continue
        previews = folder / PREVIEW_DIR
        previews.mkdir()
        images = []
        for p, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                name = f"p{p}-s{seed}.png"
                Image.new("RGB", job.size, (40 * num % 256, 120 + 60 * p, 90 * seed)).save(previews / name)
                images.append({"prompt": prompt, "seed": seed, "file": name})
        settings = {"steps": 4, "guidance": None, "width": job.size[0], "height": job.size[1], "pipeline": "black-forest-labs/FLUX.1-schnell"}
        (previews / PREVIEWS_JSON).write_text(json.dumps({"settings": settings, "images": images}))
    return root


def scored(record_scores: dict, images: dict[tuple[int, int], dict] | None = None, objective: float | None = None, parents: dict | None = None) -> dict:
    """A job record as scores18's scored previews write it: the mean per score, per image scores, the
    objective, the comparison with the parents."""
    record = {"status": "ok", "error": None, "seconds": 2.0, "bytes_written": 1000, "output": "transformer", "scores": record_scores}
    if images:
        record["image_scores"] = [{"prompt": p, "seed": s, **v} for (p, s), v in images.items()]
    if objective is not None:
        record["objective"] = objective
    if parents is not None:
        record["parents"] = parents
    return record


class Elements(HTMLParser):
    """Every element of a page, as (tag, attributes, its text), in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self.open: list[int] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), []))
        if tag not in ("img", "input", "meta", "br", "wbr", "col", "link"):
            self.open.append(len(self.elements) - 1)

    def handle_endtag(self, tag):
        while self.open:
            if self.elements[self.open.pop()][0] == tag:
                break

    def handle_data(self, data):
        for i in self.open:
            self.elements[i][2].append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict, str]]:
        """(attributes, text) of every `tag` whose attributes include `attrs` (class_ for class)."""
        want = {k.rstrip("_"): v for k, v in attrs.items()}
        return [(a, "".join(t)) for g, a, t in self.elements if g == tag and all(a.get(k) == v for k, v in want.items())]
