"""Scores and search (issue 18 items 1-2): CLIP and aesthetic scores of every preview image, per job and
ranked in the summary, the comparison with the unmerged parents, and an Optuna search through Hydra, all with
tiny scorer models built offline (a CLIPModel saved with save_pretrained, LAION's aesthetic head at its
width) and the preview tests' tiny pipeline.

One scored sweep runs in a subprocess (three ratios, the parents as reference); the searches run in-process.
Every score is checked against an independent computation: CLIP's own forward (logits_per_image) for the
clip score, the head's matrices multiplied out by hand for the aesthetic one.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli, write_recipe
from fluxrecipe.sweep import records, summarize
from fluxrecipe.sweep.page import INDEX_HTML
from fluxrecipe.sweep.scores import AESTHETIC_LAYERS, REFERENCE_DIR, SCORES_JSON, aesthetic_head
from fluxrecipe.sweep.summary import SUMMARY_MD
from sweep_helpers import build_pipeline, run_main, with_nan, write_recipes

pytestmark = pytest.mark.diffusers  # every test here renders through a diffusers pipeline built by its fixtures

PROMPTS = ["a photo of the cat", "a red house on the hill"]
SEEDS = [0, 1]
PREVIEW = ["preview=true", f"preview.prompts=[{','.join(PROMPTS)}]", "preview.seeds=[0,1]", "preview.height=32", "preview.width=32", "preview.steps=2", "progress=false"]
JOBS = ["alpha=0", "alpha=0.5", "alpha=1"]
TWO = """\
sources:
  schnell: {schnell}
  krea: {krea}
base: schnell
alpha: 0.5
beta: 0.5
rules:
  - match: 'transformer_blocks'
    op: lerp:${{recipe.alpha}}
  - match: '.*'
    op: lerp:${{recipe.beta}}
dtype: bf16
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return build_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny-flux")


@pytest.fixture(scope="module")
def clip(tmp_path_factory, pipeline) -> Path:
    """A tiny CLIP model and processor (the pipeline's character tokenizer, 32-pixel images), saved as
    transformers saves one: what preview.scorers.clip names."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    torch.manual_seed(5)
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    with torch.no_grad():  # image and text embeddings share a direction, so that cosines are positive (random ones floor at 0) and still differ
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.weight.mul_(0.5)
            norm.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def aesthetic(tmp_path_factory) -> Path:
    """LAION's aesthetic head at the tiny CLIP's width (8), random weights, saved as a .pth state dict."""
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(aesthetic_head(8).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, schnell, krea) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("score-recipes")
    write_recipe(folder, "tiny_two", TWO.format(schnell=schnell, krea=krea))
    return write_recipes(folder, schnell, krea, with_nan(krea, tmp_path_factory.mktemp("nan") / "krea"))


def scoring(pipeline: Path, clip: Path, aesthetic: Path) -> list[str]:
    return [*PREVIEW, f"preview.pipeline={pipeline}", "preview.score=[clip,aesthetic]", f"preview.scorers.clip={clip}", f"preview.scorers.aesthetic={aesthetic}"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, pipeline, clip, aesthetic, env) -> Path:
    """`-m recipe=tiny recipe.alpha=0,0.5,1` scored, the parents as reference, ranked by clip + 0.5 x aesthetic."""
    sweep_dir = tmp_path_factory.mktemp("scored") / "sweep"
    args = ["-m", "recipe=tiny", "recipe.alpha=0,0.5,1", *scoring(pipeline, clip, aesthetic), "preview.reference=[schnell,krea]",
            "search.objective={clip: 1.0, aesthetic: 0.5}", "keep_weights=false", f"hydra.sweep.dir={sweep_dir}"]
    r = run_cli(args, cwd=sweep_dir.parent, env=env)
    assert r.returncode == 0, r.stderr
    assert "Best: alpha=" in r.stdout
    return sweep_dir


def expected_scores(clip: Path, aesthetic: Path, image: Path, prompt: str) -> dict[str, float]:
    """The scores of one image, computed apart from fluxrecipe's scorer: CLIP's forward gives
    logit_scale x cos(image, text); the head's layers multiplied out on the normalised image embedding."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip)
    with Image.open(image) as picture, torch.no_grad():
        inputs = processor(text=[prompt], images=[picture.convert("RGB")], return_tensors="pt", padding=True)
        out = model(**inputs)
        cosine = out.logits_per_image[0, 0] / model.logit_scale.exp()
        x = out.image_embeds[0] / out.image_embeds[0].norm()
    state = torch.load(aesthetic, weights_only=True)
    for i in AESTHETIC_LAYERS:
        x = state[f"layers.{i}.weight"] @ x + state[f"layers.{i}.bias"]
    return {"clip": max(100 * cosine.item(), 0.0), "aesthetic": x.item()}


def test_every_image_and_job_is_scored(scored, clip, aesthetic):
    for name in JOBS:
        record = json.loads((scored / name / records.JOB_STATUS_NAME).read_text())
        images = record["image_scores"]
        assert [(i["prompt"], i["seed"]) for i in images] == [(p, s) for p in range(len(PROMPTS)) for s in SEEDS]
        for image in images:
            want = expected_scores(clip, aesthetic, scored / name / "previews" / f"p{image['prompt']}-s{image['seed']}.png", PROMPTS[image["prompt"]])
            assert image["clip"] == pytest.approx(want["clip"], rel=1e-4, abs=1e-4)
            assert image["aesthetic"] == pytest.approx(want["aesthetic"], rel=1e-4, abs=1e-5)
        means = {k: sum(i[k] for i in images) / len(images) for k in ("clip", "aesthetic")}
        assert record["scores"] == pytest.approx(means)
        assert record["objective"] == pytest.approx(means["clip"] + 0.5 * means["aesthetic"])
    clip_scores = {json.loads((scored / n / records.JOB_STATUS_NAME).read_text())["scores"]["clip"] for n in JOBS}
    assert len(clip_scores) == 3  # the merge changes the images, and so their scores


def test_summary_ranks_the_jobs_and_marks_the_best(scored):
    with open(scored / summarize.SUMMARY_CSV, newline="") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    objective = {name: json.loads((scored / name / records.JOB_STATUS_NAME).read_text())["objective"] for name in JOBS}
    order = sorted(JOBS, key=lambda n: -objective[n])
    assert [rows[n]["rank"] for n in order] == ["1 (best)", "2", "3"]
    for name in JOBS:
        record = json.loads((scored / name / records.JOB_STATUS_NAME).read_text())
        assert float(rows[name]["clip"]) == pytest.approx(record["scores"]["clip"], rel=1e-5)
        assert float(rows[name]["aesthetic"]) == pytest.approx(record["scores"]["aesthetic"], rel=1e-5, abs=1e-6)
        assert float(rows[name]["objective"]) == pytest.approx(objective[name], rel=1e-5)
    with open(scored / summarize.IMAGES_CSV, newline="") as f:
        images = list(csv.DictReader(f))
    assert len(images) == len(JOBS) * len(PROMPTS) * len(SEEDS)
    first = json.loads((scored / JOBS[1] / records.JOB_STATUS_NAME).read_text())["image_scores"][3]
    row = next(r for r in images if r["job"] == JOBS[1] and r["prompt"] == PROMPTS[first["prompt"]] and r["seed"] == str(first["seed"]))
    assert float(row["clip"]) == pytest.approx(first["clip"], rel=1e-5)
    page, markdown = (scored / INDEX_HTML).read_text(), (scored / SUMMARY_MD).read_text()
    assert '<button type="button">clip</button>' in page and '<button type="button">rank</button>' in page and "1 (best)" in page  # sortable columns (test_page.py)
    assert f"Best: {order[0]}." in markdown and "| 1 (best) |" in markdown


def test_jobs_are_compared_with_their_parents(scored):
    """alpha=0 is schnell itself: its images equal schnell's, so no image beats both parents; the count of
    every job is the images whose every score beats both parents' on the same prompt and seed."""
    parents = {}
    for source in ("schnell", "krea"):
        [folder] = (scored / REFERENCE_DIR).glob(f"{source}-*")
        assert not (folder / "transformer").exists()  # the parent's weights were only needed for its previews
        parents[source] = {(i["prompt"], i["seed"]): i for i in json.loads((folder / SCORES_JSON).read_text())["image_scores"]}
    for name in JOBS:
        record = json.loads((scored / name / records.JOB_STATUS_NAME).read_text())
        better = sum(all(i[k] > p[(i["prompt"], i["seed"])][k] for p in parents.values() for k in ("clip", "aesthetic")) for i in record["image_scores"])
        assert record["parents"] == {"better": better, "of": 4}
    assert json.loads((scored / "alpha=0" / records.JOB_STATUS_NAME).read_text())["parents"]["better"] == 0
    [schnell] = (scored / REFERENCE_DIR).glob("schnell-*")
    for image in ("p0-s0.png", "p1-s1.png"):
        with Image.open(schnell / "previews" / image) as a, Image.open(scored / "alpha=0" / "previews" / image) as b:
            assert a.tobytes() == b.tobytes()
    with open(scored / summarize.SUMMARY_CSV, newline="") as f:
        assert next(csv.DictReader(f))["parents"] == "0 of 4"


# --- search ---------------------------------------------------------------------------------------------


def search(tmp_path: Path, monkeypatch, env, args: list[str]) -> tuple[int, Path]:
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", env["FLUXRECIPE_RECIPE_PATH"])
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "search"
    return run_main(["-m", "hydra/sweeper=optuna", *args, f"hydra.sweep.dir={sweep_dir}"], monkeypatch), sweep_dir


def trials(sweep_dir: Path) -> list[tuple[str, str]]:
    with open(sweep_dir / summarize.SUMMARY_CSV, newline="") as f:
        return [(row["recipe.alpha.double_blocks.1"], row["recipe.beta"]) for row in csv.DictReader(f)]


def test_an_optuna_search_records_every_trial_and_reruns_the_same(tmp_path, monkeypatch, env, pipeline, clip, aesthetic):
    """Two parameters: a recipe's number and one block of a schedule."""
    args = ["recipe=tiny_two", "recipe.alpha.double_blocks.1=interval(0,1)", "recipe.beta=interval(0,1)", "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.seed=7",
            *scoring(pipeline, clip, aesthetic), "search.objective=clip", "keep_weights=false"]
    (tmp_path / "a").mkdir()
    code, first = search(tmp_path / "a", monkeypatch, env, args)
    assert code == 0
    done = records.read_jobs(first)
    assert [j.status for j in done] == ["ok"] * 4 and all(j.objective == j.scores["clip"] for j in done)
    tried = trials(first)
    assert len(set(tried)) == 4 and all(0 <= float(a) <= 1 and 0 <= float(b) <= 1 for a, b in tried)
    best = yaml.safe_load((first / summarize.OPTUNA_RESULTS).read_text())
    top = max(done, key=lambda j: j.objective)
    assert best["best_value"] == pytest.approx(top.objective)
    assert {k: str(v) for k, v in best["best_params"].items()} == {k: v for k, v in top.override_map().items() if k in ("recipe.alpha.double_blocks.1", "recipe.beta")}
    assert "optimization_results.yaml" in (first / INDEX_HTML).read_text()
    (tmp_path / "b").mkdir()
    code, again = search(tmp_path / "b", monkeypatch, env, args)
    assert code == 0 and trials(again) == tried


def test_a_pareto_search_marks_its_front(tmp_path, monkeypatch, env, pipeline, clip, aesthetic):
    args = ["recipe=tiny", "recipe.alpha=interval(0,1)", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=1",
            *scoring(pipeline, clip, aesthetic), "search.objective=[clip,aesthetic]", "keep_weights=false"]
    code, sweep_dir = search(tmp_path, monkeypatch, env, args)
    assert code == 0
    done = records.read_jobs(sweep_dir)
    front = [j.name for j in done if not any(o.objective[0] >= j.objective[0] and o.objective[1] >= j.objective[1] and o.objective != j.objective for o in done)]
    with open(sweep_dir / summarize.SUMMARY_CSV, newline="") as f:
        assert [row["job"] for row in csv.DictReader(f) if row["pareto"] == "front"] == front
    assert len(yaml.safe_load((sweep_dir / summarize.OPTUNA_RESULTS).read_text())["solutions"]) == len(front)


def test_a_failed_trial_does_not_stop_the_search(tmp_path, monkeypatch, env, pipeline, clip, aesthetic, capsys):
    """A trial whose merge fails (a NaN in a source) is recorded and returns the worst value; the search goes on."""
    args = ["recipe=tiny_nan", "recipe.alpha=interval(0,1)", "hydra.sweeper.n_trials=2", *scoring(pipeline, clip, aesthetic), "search.objective=clip"]
    code, sweep_dir = search(tmp_path, monkeypatch, env, args)
    assert code == 1 and "2 jobs, 0 ok, 2 failed" in capsys.readouterr().err
    assert [j.status for j in records.read_jobs(sweep_dir)] == ["failed", "failed"]
    assert yaml.safe_load((sweep_dir / summarize.OPTUNA_RESULTS).read_text())["best_value"] == -math.inf


@pytest.mark.parametrize(
    "change, message",
    [
        (["recipe.alpah=interval(0,1)"], "recipe 'tiny' has no 'alpah' (did you mean recipe.alpha?)"),  # said before Hydra starts
        (["recipe.alpha=interval(0,1)", "preview.scorers.clip=no-such-clip-folder"], "preview.scorers.clip=no-such-clip-folder"),
        (["recipe.alpha=interval(0,1)", "preview.scorers.aesthetic=no-such-head.pth"], "preview.scorers.aesthetic=no-such-head.pth"),
        (["recipe.alpha=interval(0,1)", "preview.reference=[schnel]"], "preview.reference names schnel"),
        (["recipe.alpha=interval(0,1)", "search.objective=sharpness"], "search.objective names sharpness, which preview.score"),
    ],
)
def test_a_search_is_refused_before_any_trial(tmp_path, monkeypatch, env, pipeline, clip, aesthetic, capsys, change, message):
    objective = [] if any(c.startswith("search.objective=") for c in change) else ["search.objective=clip"]
    args = ["recipe=tiny", "hydra.sweeper.n_trials=2", *scoring(pipeline, clip, aesthetic), *objective, *change]
    code, sweep_dir = search(tmp_path, monkeypatch, env, args)
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err, err
    assert ("nothing was started" in err) == ("alpah" not in message) and not sweep_dir.exists()


def test_a_search_needs_an_objective_and_a_range(tmp_path, monkeypatch, env, pipeline, clip, aesthetic, capsys):
    code, sweep_dir = search(tmp_path, monkeypatch, env, ["recipe=tiny", "recipe.alpha=0.5", *scoring(pipeline, clip, aesthetic)])
    err = capsys.readouterr().err
    assert code == 1 and "nothing to search" in err and "maximises search.objective" in err and not sweep_dir.exists()


def test_a_score_setting_that_changes_nothing_is_refused(tmp_path, monkeypatch, env, pipeline, clip, capsys):
    monkeypatch.setenv("FLUXRECIPE_RECIPE_PATH", env["FLUXRECIPE_RECIPE_PATH"])
    monkeypatch.chdir(tmp_path)
    base = ["recipe=tiny", *PREVIEW, f"preview.pipeline={pipeline}", f"hydra.run.dir={tmp_path / 'run'}"]
    for extra, said in [
        ([f"preview.scorers.clip={clip}"], "changes nothing without its score"),
        (["preview.score=[clip]", "preview.scorers.aesthetic=x.pth"], "preview.scorers.aesthetic=x.pth changes nothing"),
        (["preview.score=[clip]", "search.objective=clip"], "use it with -m"),
        (["preview.score=[clip,clip]"], "each once"),
    ]:
        assert run_main([*base, *extra], monkeypatch) == 1
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "run").exists()
