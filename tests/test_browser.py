"""The sweep page in a real browser (issue 23): headless Chromium, driven by selenium, opens the index.html of
a real previewed sweep (five alpha values on the tiny pipeline, scores written into its job records as scored
previews write them) from disk at 1280 px, as a person would: one grid labelled by alpha, nothing wider than
the window, the summary sorted by a click, an image opened by a click, two jobs flipped, a swept key on each
axis of a 2-D sweep. It saves a screenshot of the page; with FLUXRECIPE_SCREENSHOT=FILE it writes it there
too (docs/img/sweep-page.png is made so: docs/sweeps.md).

Skipped, saying what is missing, without Chromium, chromedriver or selenium: tests/browser/install.sh
installs them (.ci/run runs it where apt is available).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from fluxrecipe.sweep import records, summarize
from fluxrecipe.sweep.page import INDEX_HTML
from page_helpers import FakeJob, write_sweep
from sweep_helpers import build_pipeline, write_recipes

WIDTH = 1280
ALPHAS = ["0", "0.25", "0.5", "0.75", "1"]
PROMPTS = ["a photo of the cat", "a red house on the hill"]
SIZE = 64
SCREENSHOT_ENV = "FLUXRECIPE_SCREENSHOT"
INSTALL = "tests/browser/install.sh"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium"
    names = [n for n, found in (("chromium", _chromium()), ("chromedriver", shutil.which("chromedriver"))) if not found]
    return " and ".join(names) or None


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if missing := _missing():
        pytest.skip(f"the browser test needs {missing}: run {INSTALL} (Debian's chromium and chromium-driver; selenium is in the test extra)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={WIDTH},900", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, schnell, krea) -> Path:
    """`-m recipe=tiny recipe.alpha=0,0.25,0.5,0.75,1 preview=true keep_weights=false` on the tiny pipeline,
    then scores written into its job records (the test's own numbers: what scored previews write) and the
    summary written again."""
    pipeline = build_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-flux")
    env = write_recipes(tmp_path_factory.mktemp("recipes"), schnell, krea, krea)
    sweep_dir = tmp_path_factory.mktemp("sweeps") / "tiny_alpha"
    preview = ["preview=true", f"preview.prompts=[{','.join(PROMPTS)}]", "preview.seeds=[0,1]", f"preview.height={SIZE}", f"preview.width={SIZE}", "preview.steps=2"]
    args = ["-m", "recipe=tiny", f"recipe.alpha={','.join(ALPHAS)}", *preview, f"preview.pipeline={pipeline}", "keep_weights=false", "progress=false"]
    r = run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    for i, alpha in enumerate(ALPHAS):
        path = sweep_dir / f"alpha={alpha}" / records.JOB_STATUS_NAME
        record = json.loads(path.read_text())
        clip = round(0.26 + 0.04 * i - 0.012 * i * i, 4)  # highest at alpha 0.5
        record.update(scores={"clip": clip, "aesthetic": round(5.1 + 0.1 * i, 3)}, objective=clip, parents={"better": min(i, 4 - i) * 2, "of": 4},
                      image_scores=[{"prompt": p, "seed": s, "clip": round(clip + 0.01 * (p - s), 4)} for p in range(len(PROMPTS)) for s in (0, 1)])
        path.write_text(json.dumps(record))
    summarize.summarize(sweep_dir)
    return sweep_dir


def open_page(driver, folder: Path):
    driver.get((folder / INDEX_HTML).as_uri())
    driver.execute_script("return document.fonts.ready")
    return driver


def visible(driver, css: str) -> list:
    return [e for e in driver.find_elements("css selector", css) if e.is_displayed()]


def overflowing(driver) -> list[str]:
    """The elements that reach past the window's right edge (and the page's own width, if it is wider)."""
    return driver.execute_script("""
        const w = window.innerWidth, out = [];
        if (document.documentElement.scrollWidth > w) out.push('page: scrollWidth ' + document.documentElement.scrollWidth);
        for (const e of document.querySelectorAll('body *')) {
          const r = e.getBoundingClientRect();
          if (r.width && r.right > w + 0.5) out.push(e.tagName + (e.id ? '#' + e.id : '') + ' right ' + r.right);
        }
        return out;""")


def summary_column(driver, n: int) -> list[str]:
    return [row.find_elements("css selector", "td")[n].get_attribute("data-sort") for row in driver.find_elements("css selector", "#summary tbody tr")]


def test_one_grid_labelled_by_what_differs(browser, sweep):
    page = open_page(browser, sweep)
    assert page.execute_script("return window.innerWidth") == WIDTH
    assert len(visible(page, "table.grid")) == 1 and not page.find_elements("css selector", "img[src$='grid.png']")
    heads = visible(page, "#grid thead th[data-j]")
    assert [h.get_attribute("data-label") for h in heads] == [f"alpha={a}" for a in ALPHAS]
    assert [h.text.splitlines()[0] for h in heads] == [f"alpha={a}" for a in ALPHAS[:2]] + ["alpha=0.5 ★ best"] + [f"alpha={a}" for a in ALPHAS[3:]]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [f"alpha={a}" for a in ALPHAS]  # folders: only what differs
    images = visible(page, "#grid img")
    assert len(images) == len(ALPHAS) * len(PROMPTS) * 2
    assert all(page.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == SIZE for i in images)
    assert {i.size["width"] for i in images} == {SIZE}  # at its own size: five columns of 64 px fit in 1280


def test_nothing_is_wider_than_the_window(browser, sweep):
    page = open_page(browser, sweep)
    assert overflowing(page) == []
    page.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")  # every override and error unfolded
    assert overflowing(page) == []


def test_the_summary_sorts_by_any_column(browser, sweep):
    page = open_page(browser, sweep)
    names = [h.text for h in page.find_elements("css selector", "#summary thead th")]
    alpha, clip, parents = names.index("alpha"), names.index("clip"), names.index("parents")
    button = page.find_element("css selector", f"#summary thead th:nth-child({clip + 1}) button")
    button.click()
    clips = [float(c) for c in summary_column(page, clip)]
    assert clips == sorted(clips) and page.find_elements("css selector", "#summary thead th")[clip].get_attribute("aria-sort") == "ascending"
    button.click()
    assert [float(c) for c in summary_column(page, clip)] == sorted(clips, reverse=True)
    assert summary_column(page, alpha)[0] == "0.5"  # the best first
    page.find_element("css selector", f"#summary thead th:nth-child({parents + 1}) button").click()
    assert summary_column(page, parents) == ["0 of 4", "0 of 4", "2 of 4", "2 of 4", "4 of 4"]
    page.find_element("css selector", "#summary thead th:nth-child(1) button").click()
    assert summary_column(page, 0) == [f"alpha={a}" for a in ALPHAS]
    best = page.find_elements("css selector", "#summary tr.best")
    assert len(best) == 1 and best[0].text.startswith("alpha=0.5")


def test_a_click_opens_the_image_and_two_jobs_flip(browser, sweep):
    page = open_page(browser, sweep)
    home = page.current_window_handle
    cell = page.find_element("css selector", '#grid td[data-r="2"][data-j="1"] img')
    cell.click()
    opened = [h for h in page.window_handles if h != home]
    assert len(opened) == 1
    page.switch_to.window(opened[0])
    assert page.current_url == (sweep / "alpha=0.25" / "previews" / "p1-s0.png").as_uri()
    assert page.execute_script("return document.images[0].naturalWidth") == SIZE
    page.close()
    page.switch_to.window(home)

    # A is the best job (0.5), B the first other one (0); flipping shows one at a time, a click the other
    assert [f.text for f in page.find_elements("css selector", "#cmp-view figcaption")] == ["A: alpha=0.5", "B: alpha=0"]
    page.find_element("css selector", "input[name='cmp-mode'][value='flip']").click()
    captions = []
    for _ in range(3):
        figure = page.find_element("css selector", "#cmp-view figure")
        captions.append(figure.find_element("css selector", "figcaption").text)
        figure.find_element("css selector", "img").click()
    assert captions == ["A: alpha=0.5", "B: alpha=0", "A: alpha=0.5"] and page.window_handles == [home]  # flipped, not opened


def test_a_swept_key_on_each_axis(browser, tmp_path):
    """A 2-D sweep (hand-written folder): columns alpha, rows alpha.double_blocks.3, for the image chosen."""
    from selenium.webdriver.support.select import Select

    overrides = [[f"recipe.alpha={a}", f"recipe.alpha.double_blocks.3={b}"] for a in ("0.25", "0.5") for b in ("0.8", "1")]
    root = write_sweep(tmp_path / "sweep", [FakeJob(f"j{i}", o) for i, o in enumerate(overrides)])
    summarize.summarize(root)
    page = open_page(browser, root)
    Select(page.find_element("id", "layout")).select_by_index(1)
    Select(page.find_element("id", "image")).select_by_index(3)  # prompt 1, seed 1
    assert visible(page, "table.grid") == [page.find_element("id", "pivot")]
    rows = page.find_elements("css selector", "#pivot tr")
    assert [th.text for th in rows[0].find_elements("css selector", "th")] == ["alpha.double_blocks.3 \\ alpha", "alpha=0.25", "alpha=0.5"]
    sources = [[img.get_attribute("src").rsplit("/", 3)[-3:] for img in row.find_elements("css selector", "img")] for row in rows[1:]]
    assert sources == [[["j0", "previews", "p1-s1.png"], ["j2", "previews", "p1-s1.png"]], [["j1", "previews", "p1-s1.png"], ["j3", "previews", "p1-s1.png"]]]
    assert overflowing(page) == []


def test_screenshot(browser, sweep, tmp_path):
    """The page as a person sees it at 1280 px, the whole of it, saved small (a palette PNG)."""
    page = open_page(browser, sweep)
    height = min(page.execute_script("return document.documentElement.scrollHeight"), 2400)
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        raw = tmp_path / "page.png"
        page.save_screenshot(str(raw))
    finally:
        page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    with Image.open(raw) as image:
        assert image.width == WIDTH
        small = image.convert("RGB").quantize(colors=128)
    small.save(tmp_path / "sweep-page.png", optimize=True)
    if target := os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(tmp_path / "sweep-page.png", target)
