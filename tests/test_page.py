"""index.html, the sweep page (issue 23), on sweep folders written by hand: labels from what differs only, one
grid of the images at their own size (each linked), scores and the best job from job records (as
sweep/records.py reads them; their checks are tests/test_scores.py's), everything
from a record escaped, nothing loaded from elsewhere. tests/test_browser.py opens the page of a real sweep in
Chromium."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from urllib.parse import unquote

from PIL import Image

from fluxrecipe.sweep import labels, summarize
from fluxrecipe.sweep.page import INDEX_HTML
from page_helpers import PROMPTS, SEEDS, Elements, FakeJob, scored, write_sweep

SHARED = ["recipe=krea_schnell", "recipe.sources.krea=models/krea", "device=cpu", "preview=true"]
GRID_2D = [[*SHARED, f"recipe.alpha={a}", f"recipe.alpha.double_blocks.3={b}"] for a in ("0.25", "0.5") for b in ("0.8", "1")]


def page_of(root: Path) -> tuple[str, Elements]:
    summarize.summarize(root)
    text = (root / INDEX_HTML).read_text()
    return text, Elements(text)


def two_d_sweep(root: Path, records: list[dict] | None = None) -> Path:
    names = labels.folder_names(GRID_2D)
    records = records or [FakeJob("x", []).record] * len(names)
    return write_sweep(root, [FakeJob(n, o, r) for n, o, r in zip(names, GRID_2D, records)])


def test_jobs_are_labelled_by_what_differs_and_keep_their_full_overrides(tmp_path):
    assert labels.folder_names(GRID_2D) == [f"alpha={a},alpha.double_blocks.3={b}" for a in ("0.25", "0.5") for b in ("0.8", "1")]
    text, page = page_of(two_d_sweep(tmp_path / "sweep"))
    heads = page.find("th", **{"data-j": "0"}) + page.find("th", **{"data-j": "3"})
    assert [a["data-label"] for a, _ in heads] == ["alpha=0.25, alpha.double_blocks.3=0.8", "alpha=0.5, alpha.double_blocks.3=1"]
    assert [(a["data-v0"], a["data-v1"]) for a, _ in heads] == [("0.25", "0.8"), ("0.5", "1")]
    assert "What differs: <b>alpha</b> (0.25, 0.5), <b>alpha.double_blocks.3</b> (0.8, 1)." in text
    # the shared overrides are in no label, only in each job's folded overrides
    for attrs, _ in page.find("th") + page.find("option"):
        assert "krea_schnell" not in attrs.get("data-label", "") and "models/krea" not in attrs.get("data-label", "")
    overrides = [t for a, t in page.find("code")]
    assert len(overrides) == 2 * 4 and all("recipe.sources.krea=models/krea" in t and "device=cpu" in t for t in overrides)
    assert [t for a, t in page.find("summary") if t == "overrides"] == ["overrides"] * 8  # folded: one click away
    # the summary's columns of swept keys: the short name, the key in full on hover
    assert [(a["title"], t) for a, t in page.find("th") if a.get("title")] == [("recipe.alpha", "alpha"), ("recipe.alpha.double_blocks.3", "alpha.double_blocks.3")]
    # a swept key on each axis
    assert [t for a, t in page.find("option") if a.get("data-columns")] == [
        "columns: alpha, rows: alpha.double_blocks.3", "columns: alpha.double_blocks.3, rows: alpha"]


def test_one_grid_of_the_images_at_their_own_size_each_linked(tmp_path):
    root = tmp_path / "sweep"
    jobs = [FakeJob(f"alpha={a}", [*SHARED, f"recipe.alpha={a}"], size=(96, 64)) for a in ("0", "0.5", "1")]
    jobs.append(FakeJob("alpha=2", [*SHARED, "recipe.alpha=2"], {"status": "failed", "error": "alpha 2 is out of range", "seconds": 0.1}, size=None))
    text, page = page_of(write_sweep(root, jobs))
    assert len(page.find("table", id="grid")) == 1 and not page.find("img", src="grid.png")  # one grid: grid.png is a file, not shown
    assert page.find("table", id="pivot") == [] or "hidden" in page.find("table", id="pivot")[0][0]
    images = [a for a, _ in page.find("img") if a["src"].startswith("alpha")]
    assert len(images) == 3 * len(PROMPTS) * len(SEEDS)
    for attrs in images:
        file = root / unquote(attrs["src"])
        with Image.open(file) as image:
            assert (int(attrs["width"]), int(attrs["height"])) == image.size == (96, 64)
        assert f'<a href="{attrs["src"]}" target="_blank" rel="noopener"><img src="{attrs["src"]}"' in text  # a click opens it
    cells = page.find("td", **{"data-j": "1"})
    assert [a["data-r"] for a, _ in cells] == ["0", "1", "2", "3"]
    failed = page.find("td", class_="empty")
    assert len(failed) == 4 and all(t.startswith("failed") and "alpha 2 is out of range" in t for _, t in failed)
    # the rows: prompt and seed; the comparison: the jobs with images, the first two chosen
    assert [t for a, t in page.find("th", scope="row")] == [f"{p}seed {s}" for p in PROMPTS for s in SEEDS]
    assert [("selected" in a, t) for a, t in page.find("option") if t.startswith("alpha")] == [(True, "alpha=0"), (False, "alpha=0.5"), (False, "alpha=1"), (False, "alpha=0"), (True, "alpha=0.5"), (False, "alpha=1")]
    assert not page.find("select", id="layout")  # one swept key: no axes to choose
    table = page.find("table", id="grid")[0][0]
    assert table["style"] == "max-width:{}px".format(150 + 4 * 120)  # columns no wider than the images need (at least 120 px)


def test_scores_are_columns_and_the_best_job_is_marked(tmp_path):
    images = {(0, 0): {"clip": 0.31, "aesthetic": 5.5}, (1, 1): {"clip": 0.25}}
    records = [
        scored({"clip": 0.30, "aesthetic": 5.0}, images, objective=0.4, parents={"better": 1, "of": 4}),
        scored({"clip": 0.35, "aesthetic": 4.0}, objective=0.9, parents={"better": 3, "of": 4}),  # the best
        scored({"clip": 0.40, "aesthetic": 6.0}, objective=0.5, parents={"better": 4, "of": 4}),
        {**scored({"clip": 0.9}, objective=5.0), "status": "failed", "error": "stopped"},  # failed: never the best
    ]
    root = two_d_sweep(tmp_path / "objective", records)
    text, page = page_of(root)
    with open(root / summarize.SUMMARY_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["clip"], r["aesthetic"], r["objective"], r["parents"], r["rank"]) for r in rows] == [
        ("0.3", "5", "0.4", "1 of 4", "3"), ("0.35", "4", "0.9", "3 of 4", "1 (best)"), ("0.4", "6", "0.5", "4 of 4", "2"), ("0.9", "", "5", "", "")]
    best_rows = page.find("tr", class_="best")
    assert len(best_rows) == 1 and best_rows[0][1].startswith("alpha=0.25,alpha.double_blocks.3=1")
    assert [a["data-label"] for a, _ in page.find("th", class_="best")] == ["alpha=0.25, alpha.double_blocks.3=1"]
    head = [t for a, t in page.find("th") if a.get("data-j") == "1"][0]
    assert "clip 0.35 · aesthetic 4 · objective 0.9" in head
    # image scores under their image: prompt 0 seed 0, prompt 1 seed 1 (an image without a score shows none)
    captions = {(a["data-r"], a["data-j"]): t for a, t in page.find("td") if "data-r" in a}
    assert captions[("0", "0")] == "clip 0.31 · aesthetic 5.5" and captions[("3", "0")] == "clip 0.25" and captions[("1", "0")] == ""
    assert [t for a, t in page.find("div", class_="scores")].count("clip 0.31 · aesthetic 5.5") == 1
    sort_keys = [a["data-sort"] for a, t in page.find("td") if a.get("data-sort", "").endswith(" of 4")]
    assert sort_keys == ["1 of 4", "3 of 4", "4 of 4"]

    # without an objective the highest first score wins; without scores no job is marked
    records = [scored({"clip": c, "aesthetic": 9 - c}) for c in (0.2, 0.3, 0.25, 0.1)]
    _, page = page_of(two_d_sweep(tmp_path / "first-score", records))
    assert [t.split("★")[0].strip() for a, t in page.find("tr", class_="best")] == ["alpha=0.25,alpha.double_blocks.3=1"]
    text, page = page_of(two_d_sweep(tmp_path / "unscored"))
    assert not page.find("tr", class_="best") and "best" not in "".join(t for a, t in page.find("th"))


def test_everything_from_a_job_record_is_escaped_and_nothing_is_loaded_from_elsewhere(tmp_path):
    hostile = ['recipe.description=<img src=x onerror=alert(1)>', 'recipe.note=x" onmouseover="alert(2)', "recipe.alpha=</script><script>alert(3)</script>"]
    jobs = [
        FakeJob("a", [*SHARED, *hostile]),
        FakeJob("b", [*SHARED, "recipe.description=plain", 'recipe.note=y', "recipe.alpha=0.5"],
                {"status": "failed", "error": "<script>alert(4)</script> [click](javascript:alert(5))", "seconds": 1.0}),
    ]
    text, page = page_of(write_sweep(tmp_path / "sweep", jobs))
    assert text.count("<script") == 1 and text.count("</script>") == 1  # the page's own, at the end
    assert text.rindex("<script>") > max(text.find("alert(1)"), text.find("alert(3)"), text.find("alert(4)"))
    for tag, attrs, _ in page.elements:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)  # no handler attribute: the page's script binds its own
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not re.match(r"[a-z]+:|//", value), (tag, value)  # relative links only: no other site, no javascript:
    assert "<link" not in text and "@import" not in text and "url(" not in text and "http" not in text.split("<script>")[1]
    heads = page.find("th", **{"data-j": "0"})
    assert heads[0][0]["data-label"].startswith("alpha=</script><script>alert(3)</script>, description=<img src=x onerror=alert(1)>")
    assert "&lt;img src=x onerror=alert(1)&gt;" in text and "x&quot; onmouseover=&quot;alert(2)" in text
